"""One source of truth per option: every field is a flag and a TOML key; shared options are defined once."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click
import pytest

import evl_cache
from evl_cache.cli import main
from evl_cache.config import SHARED_OPTIONS, build_config, click_options, load_config, option, option_of, shared
from evl_cache.errors import EvlCacheError

COMMAND_CONFIGS = {"extract": evl_cache.ExtractConfig, "plan": evl_cache.ExtractConfig,
                   "train": evl_cache.TrainConfig, "eval": evl_cache.EvalConfig, "zeroshot": evl_cache.ZeroShotConfig,
                   "predict": evl_cache.PredictConfig, "import-evl": evl_cache.ImportConfig,
                   "import-vificlip": evl_cache.VifiImportConfig, "export-evl": evl_cache.ExportConfig,
                   "run": evl_cache.StudyConfig, "compare": evl_cache.CompareConfig, "demo": evl_cache.DemoConfig,
                   "info": evl_cache.InfoConfig, "verify": evl_cache.VerifyConfig, "explain": evl_cache.ExplainConfig,
                   "finetune": evl_cache.FinetuneConfig, "export-vificlip": evl_cache.VifiExportConfig}


def test_every_command_has_its_config_and_nothing_else():
    assert set(main.commands) == set(COMMAND_CONFIGS)
    for name, cls in COMMAND_CONFIGS.items():
        params = {p.name for p in main.commands[name].params} - {"config_file", "as_json"}
        assert params == {f.name for f in dataclasses.fields(cls)}, name
        assert "config_file" in {p.name for p in main.commands[name].params}, name


def test_shared_options_are_defined_once():
    for cls in set(COMMAND_CONFIGS.values()):
        for field in dataclasses.fields(cls):
            if field.name in SHARED_OPTIONS:
                assert field.metadata["shared"], f"{cls.__name__}.{field.name} should be shared({field.name!r})"
    helps = {}
    for cls in set(COMMAND_CONFIGS.values()):
        for field in dataclasses.fields(cls):
            if field.metadata["shared"]:
                helps.setdefault(field.name, set()).add(field.metadata["help"])
    assert {name: len(texts) for name, texts in helps.items()} == {name: 1 for name in helps}
    assert set(helps) >= {"device", "weights", "decode_timeout", "split"}


@dataclasses.dataclass
class _Example:
    out: Path = option(None, "where")
    count: int = option(2, "how many")
    ratio: float = option(0.5, "a ratio")
    flip: bool = option(True, "flip")
    mode: str = option("a", "mode", choices=("a", "b"))
    names: list[str] = option([], "names")
    device: str = shared("device")


def _parse(args: list[str]) -> _Example:
    @click.command()
    @click_options(_Example)
    def command(**values):
        return build_config(_Example, values)
    return command.main(args, standalone_mode=False)


def test_flags_and_toml_keys_build_the_same_config(tmp_path):
    from_flags = _parse(["--out", "x.zarr", "--count", "3", "--ratio", "1", "--no-flip", "--mode", "b",
                         "--names", "p", "--names", "q", "--device", "cpu"])
    recipe = tmp_path / "r.toml"
    recipe.write_text('[cmd]\nout = "x.zarr"\ncount = 3\nratio = 1\nflip = false\nmode = "b"\n'
                      'names = ["p", "q"]\ndevice = "cpu"\n')
    assert from_flags == load_config(_Example, recipe, "cmd", {})
    assert from_flags == _Example(Path("x.zarr"), 3, 1.0, False, "b", ["p", "q"], "cpu")
    assert _parse([]) == _Example()  # nothing given: every default
    # flags override the file; a file without the section is read at its top level
    top = tmp_path / "top.toml"
    top.write_text("count = 7\nflip = false\n")
    assert load_config(_Example, top, "cmd", {"count": 9, "flip": None}) == _Example(count=9, flip=False)


@pytest.mark.parametrize("values, message", [({"cuont": 1}, "unknown option"), ({"count": "3"}, "must be int"),
                                             ({"count": True}, "must be int"), ({"mode": "c"}, "must be one of"),
                                             ({"names": "p"}, "must be a list")])
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(EvlCacheError, match=message):
        build_config(_Example, values)


def test_urls_stay_strings_and_file_urls_are_paths():
    config = build_config(evl_cache.TrainConfig, {"features": "memory://bucket/feats.zarr", "out": "file:///tmp/r"})
    assert config.features == "memory://bucket/feats.zarr" and config.out == Path("/tmp/r")


def test_a_bad_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 'many'\n")
    with pytest.raises(EvlCacheError, match="bad.toml"):
        load_config(evl_cache.TrainConfig, bad, "train", {})


def test_every_annotation_is_a_type_the_cli_reads():
    readable = {int, float, str, bool, Path, list}
    for cls in set(COMMAND_CONFIGS.values()):
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            base = typing.get_origin(args[0]) or args[0]
            assert base in readable, f"{cls.__name__}.{name}: {hint}"


def test_a_command_takes_another_commands_option_and_a_shared_option_its_own_default():
    @dataclasses.dataclass
    class Other:
        names: list[str] = option_of(_Example, "names")
        mode: str = option_of(_Example, "mode")
        views: int = shared("eval_views", default=1)

    fields = {f.name: f for f in dataclasses.fields(Other)}
    assert fields["mode"].metadata["help"] == "mode" and fields["mode"].metadata["choices"] == ("a", "b")
    assert Other().names == [] and Other().mode == "a" and Other().views == 1
    assert fields["views"].metadata["help"] == SHARED_OPTIONS["eval_views"]["help"]
    assert fields["views"].metadata["shared"]
    with pytest.raises(EvlCacheError, match="must be one of a, b"):
        build_config(Other, {"mode": "c"})
