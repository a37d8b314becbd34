"""Option dataclasses: one source of truth for every option of every command.

Each option is a dataclass field with its default, type and help text. The click command and the TOML
recipe loader both come from the dataclass, so a CLI flag and a recipe key never drift apart:
`--eval-views 3` on the command line is `eval_views = 3` in a TOML file. An option that several
commands share with one meaning (`device`, `weights`, ...) is defined once, in `SHARED_OPTIONS`.
"""
from __future__ import annotations

import dataclasses
import functools
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from .errors import EvlCacheError

C = TypeVar("C")

SPLIT_CHOICES = ("val", "test", "train", "none", "all")

SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "device": dict(default="auto", help="where to run: cuda, cuda:N, cpu, or auto (cuda when there is one)"),
    "weights": dict(default="best", help="which weights of the run: best (best validation top-1) or last",
                    choices=("best", "last")),
    "decode_timeout": dict(default=120.0, help="seconds one video may take to decode; a slower (or hanging) one "
                                               "fails alone, the others go on (0: no limit)"),
    "split": dict(default="val", help="which videos of the cache: val, test, train, none or all",
                  choices=SPLIT_CHOICES),
    "stride": dict(default=16, help="frame stride of dense sampling"),
    "eval_views": dict(default=3, help="temporal views per validation/test video"),
}


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None,
           argument: bool = False, shared: bool = False) -> Any:
    """A config field: its default, help text, allowed values; `flag` renames its CLI flag, `argument`
    makes it a positional argument of the command."""
    meta = {"help": help, "choices": choices, "flag": flag, "argument": argument, "shared": shared}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def shared(name: str, default: Any = dataclasses.MISSING) -> Any:
    """The field of an option several commands share (`SHARED_OPTIONS`); `default` sets another default
    for one command, its meaning and help staying the shared ones."""
    values = SHARED_OPTIONS[name] if default is dataclasses.MISSING else {**SHARED_OPTIONS[name], "default": default}
    return option(**values, shared=True)


def option_of(cls: type, name: str) -> Any:
    """Another command's option `name` (a field of the config dataclass `cls`) with its default, help
    and choices, for a command that takes the same input the same way (say, `extract`'s video inputs)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    meta = field.metadata
    return option(default, meta["help"], choices=meta["choices"], flag=meta["flag"], argument=meta["argument"])


def _base_type(tp: Any) -> tuple[Any, bool]:
    """The type behind an annotation (list[X] -> list), and whether None is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    return (list if origin is list else tp), False


def _click_param(field: dataclasses.Field, tp: Any) -> Callable:
    """The click option or argument of one config field."""
    meta = field.metadata
    if meta["argument"]:
        return click.argument(field.name, nargs=-1 if tp is list else 1, required=False)  # or from --config
    name = meta["flag"] or "--" + field.name.replace("_", "-")
    default = field.default if field.default is not dataclasses.MISSING else None
    help_text = meta["help"] + ("" if default in (None, False) or tp is list else f" [default: {default}]")
    if tp is bool:
        return click.option(f"{name}/--no-{name[2:]}", field.name, default=None, help=help_text)
    kind = click.Choice(meta["choices"]) if meta["choices"] else tp if tp in (int, float) else str
    return click.option(name, field.name, type=kind, default=None, multiple=tp is list, help=help_text)


def click_options(cls: type) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option (or argument) per field of the config dataclass `cls`."""
    hints = typing.get_type_hints(cls)

    def decorate(command: Callable) -> Callable:
        for field in reversed(dataclasses.fields(cls)):
            command = _click_param(field, _base_type(hints[field.name])[0])(command)
        return command

    return decorate


def _as_path(value: Any) -> Path | str:
    """A local path as a Path (file:// URLs too); an fsspec URL (memory://, s3://) stays a string."""
    text = str(value)
    return text if "://" in text and not text.startswith("file://") else Path(text.removeprefix("file://"))


def _coerce(cls: type, name: str, value: Any) -> Any:
    hint = typing.get_type_hints(cls)[name]
    tp, _ = _base_type(hint)
    if tp is Path:
        return _as_path(value)
    if tp is list:
        if not isinstance(value, (list, tuple)):
            raise EvlCacheError(f"option {name!r} must be a list, got {value!r}")
        element = typing.get_args(hint)[0] if typing.get_args(hint) else str
        return [_as_path(v) if element is Path else str(v) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise EvlCacheError(f"option {name!r} must be {tp.__name__}, got {value!r}")
    choices = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("choices")
    if choices and value not in choices:
        raise EvlCacheError(f"option {name!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


def build_config(cls: type[C], values: dict[str, Any], base: C | None = None) -> C:
    """Make a `cls` from a dict of option values (None or an empty tuple: 'not given'), over `base` or
    the defaults."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise EvlCacheError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    given = {k: _coerce(cls, k, v) for k, v in values.items() if v is not None and v != ()}
    if base is not None:
        return dataclasses.replace(base, **given)
    return cls(**given)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe file; a clear one-line error if it is missing or malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise EvlCacheError("config file not found", path) from None
    except tomllib.TOMLDecodeError as error:
        raise EvlCacheError(f"not valid TOML: {error}", path) from None


def load_config(cls: type[C], config_file: str | Path | None, section: str, values: dict[str, Any]) -> C:
    """`cls` from a TOML file's `[section]` table (or its top level when it has no such table), with
    `values` (the flags given) over it."""
    base = None
    if config_file is not None:
        table = load_toml(config_file)
        try:
            base = build_config(cls, table.get(section, table))
        except EvlCacheError as error:
            raise EvlCacheError(str(error), config_file) from None
    return build_config(cls, values, base)


def config_command(cls: type, section: str) -> Callable[[Callable], Callable]:
    """Give a click command a flag per field of `cls` and `--config FILE`; the command function then
    receives the built config as its first argument (and any other click parameters by name)."""
    names = {f.name for f in dataclasses.fields(cls)}

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(config_file: Path | None, **values: Any) -> Any:
            extra = {k: values.pop(k) for k in list(values) if k not in names}
            return function(load_config(cls, config_file, section, values), **extra)

        wrapper = click_options(cls)(wrapper)
        return click.option("--config", "config_file", type=click.Path(path_type=Path),
                            help=f"TOML file with these options (its [{section}] table, or its top level); "
                                 f"flags override it")(wrapper)

    return decorate


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (paths as strings)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
