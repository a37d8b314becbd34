"""The CLI is a thin shell: every command's help, --config, one-line user errors, bugs with tracebacks."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import evl_cache.cli as cli
from evl_cache.cli import main
from evl_cache.errors import CacheError


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help_with_config(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--config" in result.output


def test_a_user_error_is_one_line_and_exit_code_1(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'missing.zarr'}: cache not found"]


def test_a_bad_option_in_a_config_file_is_a_user_error(tmp_path):
    recipe = tmp_path / "train.toml"
    recipe.write_text("[train]\nepoch = 3\n")
    result = CliRunner().invoke(main, ["train", "--config", str(recipe)])
    assert result.exit_code == 1 and "unknown option(s) epoch" in result.output
    assert "Traceback" not in result.output


def test_a_config_file_sets_the_options_and_flags_override_it(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "verify", lambda config: seen.append(config) or _Report())
    recipe = tmp_path / "v.toml"
    recipe.write_text('[verify]\ncache = "a.zarr"\nrepair = true\n')
    assert CliRunner().invoke(main, ["verify", "--config", str(recipe)]).exit_code == 0
    assert CliRunner().invoke(main, ["verify", "b.zarr", "--config", str(recipe), "--no-repair"]).exit_code == 0
    assert [(str(c.cache), c.repair) for c in seen] == [("a.zarr", True), ("b.zarr", False)]


class _Report:
    ok, problems = True, []

    def line(self) -> str:
        return "verify: ok"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(config):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "info", broken)
    result = CliRunner().invoke(main, ["info", "x.zarr"])
    assert isinstance(result.exception, RuntimeError)


def test_user_errors_raised_inside_a_command_are_caught(monkeypatch):
    def refused(config):
        raise CacheError("refused", "x.zarr")
    monkeypatch.setattr(cli, "info", refused)
    result = CliRunner().invoke(main, ["info", "x.zarr"])
    assert result.exit_code == 1 and result.output == "error: x.zarr: refused\n"
