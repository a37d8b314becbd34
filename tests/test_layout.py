"""The package reads as the pipeline, and no module imports from a later stage.

PIPELINE lists every module of `evl_cache` in the order data flows through them. A module may import
only modules listed before it, so stage one never depends on stage two and nothing reaches back into
a stage for a helper that belongs to the shared bottom. A new module must be placed in the list.
"""
from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import evl_cache

PACKAGE = Path(evl_cache.__file__).parent
TESTS = Path(__file__).parent

PIPELINE = [
    # the shared bottom
    "errors", "runtime", "config", "distributed",
    # videos -> clips
    "video.find", "video.tars", "video.datasets", "video.sampling", "video.decode", "video.pixels", "video.clips",
    "video.synthetic",
    # the frozen towers
    "towers.block_prompts", "towers.checkpoint_files", "towers.statistics", "towers.tiny_trunks",
    "towers.families", "towers.backbone", "towers.text", "towers.vificlip",
    # the cache, and the dataset over it
    "cache.encodings", "cache.calibration", "cache.zarr_shards", "cache.store", "cache.options", "cache.plan",
    "cache.writer", "cache.extract", "cache.verify", "cache.info", "cache.dataset",
    # the decoder, its runs and metrics
    "decoder.model", "decoder.probes", "decoder.memory", "decoder.metrics", "decoder.run", "decoder.checkpoints",
    "decoder.events", "decoder.loop", "decoder.train", "decoder.evaluate", "decoder.evl_checkpoints",
    # fine-tuning the towers themselves, online on decoded clips
    "tuning.vifi_model", "tuning.blending", "tuning.online_clips", "tuning.splits", "tuning.finetune",
    # what is built on both stages
    "apps.pages", "apps.results", "apps.predict", "apps.explain_pictures", "apps.explain", "apps.zeroshot",
    "apps.study", "apps.demo",
    "cli",
]


def _modules() -> list[str]:
    """Every module of the package (not the packages' __init__), as dotted names under evl_cache."""
    return sorted(".".join(path.relative_to(PACKAGE).with_suffix("").parts)
                  for path in PACKAGE.rglob("*.py") if path.name != "__init__.py")


def _imported(module: str) -> set[str]:
    """The evl_cache modules `module` imports anywhere in its file (function bodies too)."""
    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    package = ["evl_cache"] + module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = base + (node.module.split(".") if node.module else [])
            names = [".".join(target + [alias.name]) for alias in node.names]
            candidates = [".".join(target)] + names
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for name in candidates:
            if name.startswith("evl_cache.") and name.removeprefix("evl_cache.") in PIPELINE:
                found.add(name.removeprefix("evl_cache."))
    return found


def test_every_module_has_its_place_in_the_pipeline():
    assert sorted(PIPELINE) == _modules()
    assert len(set(PIPELINE)) == len(PIPELINE)


def test_no_module_imports_from_a_later_stage():
    later = {module: [name for name in sorted(_imported(module)) if PIPELINE.index(name) >= PIPELINE.index(module)]
             for module in PIPELINE}
    assert {module: names for module, names in later.items() if names} == {}


def test_the_check_sees_relative_absolute_and_nested_imports(tmp_path, monkeypatch):
    fake = tmp_path / "evl_cache"
    (fake / "cache").mkdir(parents=True)
    (fake / "cache" / "store.py").write_text(
        "from ..decoder import train\nfrom evl_cache.apps.demo import run_demo\n"
        "def f():\n    from .dataset import CacheDataset\n    import evl_cache.cli\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _imported("cache.store") == {"decoder.train", "apps.demo", "cache.dataset", "cli"}


def test_every_module_has_its_test_file():
    missing = [module for module in PIPELINE if not (TESTS / f"test_{module.split('.')[-1]}.py").exists()]
    assert missing == []


def test_the_public_api_has_every_command_with_its_config():
    for function, config in (("extract", "ExtractConfig"), ("plan", "ExtractConfig"), ("verify", "VerifyConfig"),
                             ("info", "InfoConfig"), ("train", "TrainConfig"), ("evaluate", "EvalConfig"),
                             ("predict", "PredictConfig"), ("zeroshot", "ZeroShotConfig"), ("run_study", "StudyConfig"),
                             ("compare", "CompareConfig"), ("import_evl", "ImportConfig"), ("export_evl", "ExportConfig"),
                             ("import_vificlip", "VifiImportConfig"), ("run_demo", "DemoConfig"),
                             ("explain", "ExplainConfig"), ("finetune", "FinetuneConfig"),
                             ("export_vificlip", "VifiExportConfig")):
        assert callable(getattr(evl_cache, function)), function
        assert dataclasses.is_dataclass(getattr(evl_cache, config)), config
