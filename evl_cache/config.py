"""Option dataclasses: one source of truth for every option of every command.

Each option is a dataclass field with its default, type and help text. The click command and the TOML
recipe loader are both generated from the dataclass, so a CLI flag and a recipe key never drift apart:
`--eval-views 3` on the command line is `eval_views = 3` in a TOML file.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import click
import tomllib

from .errors import EvlCacheError

C = TypeVar("C")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           flag: str | None = None, cli: bool = True) -> Any:
    """A config field: its default, its help text and, optionally, its allowed values."""
    meta = {"help": help, "choices": choices, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """The scalar type behind an annotation, and whether None is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def click_options(cls: type) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option per field of the config dataclass `cls`."""
    types_by_name = _field_types(cls)

    def decorate(command: Callable) -> Callable:
        for field in reversed(dataclasses.fields(cls)):
            meta = field.metadata
            if not meta.get("cli", True):
                continue
            name = meta.get("flag") or "--" + field.name.replace("_", "-")
            tp, optional = _base_type(types_by_name[field.name])
            default = field.default if field.default is not dataclasses.MISSING else None
            kwargs: dict[str, Any] = {"help": meta["help"], "default": None, "show_default": False}
            shown = "" if default is None else f" [default: {default}]"
            if tp is bool:
                negative = "--no-" + name[2:]
                decl = [f"{name}/{negative}"]
                kwargs["help"] = meta["help"] + shown
            else:
                decl = [name]
                if meta.get("choices"):
                    kwargs["type"] = click.Choice(meta["choices"])
                elif tp in (int, float, str):
                    kwargs["type"] = tp
                elif tp is Path:
                    kwargs["type"] = str  # made a Path (or kept as an fsspec URL) by build_config
                else:
                    kwargs["type"] = str
                kwargs["help"] = meta["help"] + shown
            command = click.option(*decl, field.name, **kwargs)(command)
        return command

    return decorate


def _coerce(cls: type, name: str, value: Any) -> Any:
    tp, optional = _base_type(_field_types(cls)[name])
    if value is None:
        return None
    if tp is Path:  # an fsspec URL (memory://, s3://, file://) stays a string: Path would mangle '//'
        return str(value) if "://" in str(value) and not str(value).startswith("file://") else \
            Path(str(value).removeprefix("file://"))
    if tp is float and isinstance(value, int):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise EvlCacheError(f"option {name!r} must be {tp.__name__}, got {value!r}")
    choices = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("choices")
    if choices and value not in choices:
        raise EvlCacheError(f"option {name!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


def build_config(cls: type[C], values: dict[str, Any], base: C | None = None) -> C:
    """Make a `cls` from a dict of option values (None means 'not given'), over `base` or defaults."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise EvlCacheError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    given = {k: _coerce(cls, k, v) for k, v in values.items() if v is not None}
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
