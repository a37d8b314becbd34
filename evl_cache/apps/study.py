"""`evl-cache run RECIPE`: a whole study from one cache.

A recipe is a TOML file with an `[extract]` table (one cache; or named tables `[extract.NAME]`, one per
cache, and then each run says `cache = "NAME"`), a `[train]` table (the options every run shares) and
`[runs.NAME]` tables (each run's overrides), plus an optional `[study]` table:
`out` (the study folder; default: the recipe's name under `studies/`) and `sample_videos = true` (make
the demo's sample dataset at `extract.videos` when it is missing). Relative paths are relative to the
current folder, as on the command line.

The study extracts once (resuming an incomplete cache), then trains and evaluates each run in
`<out>/runs/NAME`, skipping runs already finished with the same options and resuming killed ones. A
run that fails is reported in the table with its error and the others go on. Results go to
`<out>/results.md`, `results.csv`, `results.png` and `results.html`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..cache.extract import extract
from ..cache.options import ExtractConfig
from ..cache.plan import plan
from ..cache.store import PENDING, FeatureStore
from ..config import build_config, load_toml, option, to_dict
from ..decoder.train import RESUMABLE_CHANGES, TrainConfig, train
from ..errors import EvlCacheError
from ..video.synthetic import make_sample_dataset
from .results import RunRow, markdown_table, read_run, write_results

log = logging.getLogger(__name__)


@dataclass
class Study:
    """A parsed recipe: where it writes, its extraction, and its runs' full training configs."""
    name: str
    out: Path
    caches: dict[str, ExtractConfig]
    runs: dict[str, TrainConfig]
    run_cache: dict[str, str]
    sample_videos: bool = False


def load_study(path: str | Path) -> Study:
    """Read and check a recipe; every option is checked against the config dataclasses."""
    path = Path(path)
    recipe = load_toml(path)
    unknown = sorted(set(recipe) - {"study", "extract", "train", "runs"})
    if unknown:
        raise EvlCacheError(f"unknown table(s) {', '.join(unknown)} (expected study, extract, train, runs)", path)
    study = dict(recipe.get("study", {}))
    tables = recipe.get("extract", {})
    named = bool(tables) and all(isinstance(v, dict) for v in tables.values())
    caches = {}
    for cache_name, table in (tables.items() if named else [("", tables)]):
        try:
            caches[cache_name] = build_config(ExtractConfig, table)
        except EvlCacheError as error:
            raise EvlCacheError(f"[extract{'.' + cache_name if cache_name else ''}]: {error}", path) from None
        if caches[cache_name].out is None:
            raise EvlCacheError("every [extract] table needs out = the cache path", path)
    out = Path(study.pop("out", Path("studies") / path.stem))
    sample = bool(study.pop("sample_videos", False))
    if study:
        raise EvlCacheError(f"unknown [study] key(s) {', '.join(sorted(study))} (expected out, sample_videos)", path)
    runs, run_cache = {}, {}
    for name, overrides in (recipe.get("runs") or {"default": {}}).items():
        overrides = dict(overrides)
        cache_name = overrides.pop("cache", "" if not named else None)
        if cache_name not in caches:
            raise EvlCacheError(f"[runs.{name}]: cache = {cache_name!r} names no [extract] table "
                                f"(caches: {', '.join(caches) or 'one, unnamed'})", path)
        try:
            base = build_config(TrainConfig, {**recipe.get("train", {}), "features": caches[cache_name].out})
            runs[name] = build_config(TrainConfig, {**overrides, "out": out / "runs" / name, "resume": True}, base)
        except EvlCacheError as error:
            raise EvlCacheError(f"[runs.{name}]: {error}", path) from None
        run_cache[name] = cache_name
    return Study(path.stem, out, caches, runs, run_cache, sample)


def _cache_complete(path: Path) -> bool | None:
    """True if every video is done or failed, False if some are pending, None if there is no cache."""
    if not path.exists():
        return None
    with FeatureStore(path) as store:
        return not (store.column("status") == PENDING).any()


def _run_state(config: TrainConfig) -> str:
    """'new', 'finished' (same options), 'partial' (same options) or 'conflict' (other options)."""
    saved = Path(config.out) / "config.json"
    if not saved.exists():
        return "new"
    old = json.loads(saved.read_text()).get("train") or {}
    new = to_dict(config)
    if any(old.get(k) != v for k, v in new.items() if k not in RESUMABLE_CHANGES):
        return "conflict"
    return "finished" if read_run(config.out).status == "finished" else "partial"


def describe(study: Study) -> str:
    """What `run` would do, the cache size it needs, and what exists already (nothing is run)."""
    lines = [f"study {study.name}: {len(study.runs)} runs in {study.out}"]
    for config in study.caches.values():
        cache = Path(config.out)
        videos = config.videos
        if videos is not None and not Path(videos).exists() and study.sample_videos:
            lines.append(f"extract: sample videos will be made in {videos}")
            lines.append(f"extract: {cache} will be written")
            continue
        try:
            cache_plan = plan(dataclasses.replace(config, probe_mb=0))
        except EvlCacheError as error:
            lines.append(f"extract: {cache} cannot be planned: {error}")
            continue
        size = cache_plan.total_bytes[config.storage]
        status = {None: "missing: will extract", False: "incomplete: will resume",
                  True: "complete"}[_cache_complete(cache)]
        lines.append(f"extract: {cache} {status}; {sum(cache_plan.videos.values())} videos {cache_plan.videos}, "
                     f"{size / 1e9:.3f} GB of features ({config.model}, {config.blocks} blocks, "
                     f"{config.frames} frames, {config.storage})")
    for name, config in study.runs.items():
        action = {"new": "will train", "finished": "finished: will skip", "partial": "partial: will resume",
                  "conflict": "holds a run with other options: will fail"}[_run_state(config)]
        lines.append(f"run {name}: {action} -> {config.out}")
    return "\n".join(lines)


@dataclass
class StudyConfig:
    """Options of `evl-cache run`."""
    recipe: Path = option(None, "the study recipe (a TOML file)", argument=True)
    only: list[str] = option([], "run only this named run (repeatable)")
    dry_run: bool = option(False, "print what would run, the cache size it needs and what exists; run nothing")


def run_study(config: StudyConfig) -> list[RunRow] | str:
    """Run the recipe's study (returns the results table's rows), or with `dry_run` describe it."""
    if config.recipe is None:
        raise EvlCacheError("a recipe file is required")
    study = load_study(config.recipe)
    return describe(study) if config.dry_run else run(study, config.only or None)


RESULT_FILES = ("results.md", "results.csv", "results.png", "results.html")


def _check_study_folder(out: Path) -> None:
    """Refuse to write results over files that are not a study's: results files without runs/ beside."""
    found = [name for name in RESULT_FILES if (out / name).exists()]
    if found and not (out / "runs").is_dir():
        raise EvlCacheError(f"holds {found[0]} but no runs/ folder: not a study folder, and its files would be "
                            f"replaced; set [study] out to another folder", out)


def run(study: Study, only: list[str] | None = None) -> list[RunRow]:
    """Extract once, then train and evaluate each run; returns the table rows (also written to files)."""
    names = list(study.runs) if not only else only
    missing = [n for n in names if n not in study.runs]
    if missing:
        raise EvlCacheError(f"no run named {', '.join(missing)} (runs: {', '.join(study.runs)})")
    _check_study_folder(study.out)
    for cache_name in dict.fromkeys(study.run_cache[name] for name in names):
        config = study.caches[cache_name]
        if study.sample_videos and config.videos is not None and not Path(config.videos).exists():
            make_sample_dataset(config.videos)
            log.info("study: wrote sample videos to %s", config.videos)
        if _cache_complete(Path(config.out)) is not True:
            extract(config)
    study.out.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    for name in names:
        config = study.runs[name]
        state = _run_state(config)
        if state == "finished":
            log.info("study: run %s already finished with the same options; skipped", name)
            continue
        if state == "conflict":
            errors[name] = f"{config.out} holds a run with other options; delete it or rename the run"
            log.error("study: run %s: %s", name, errors[name])
            continue
        log.info("study: run %s (%s)", name, "resuming" if state == "partial" else "starting")
        try:
            train(config)
        except EvlCacheError as error:
            errors[name] = str(error)
            log.error("study: run %s failed: %s", name, error)
        except Exception as error:  # a bug in one run must not lose the others; keep its traceback
            errors[name] = f"{type(error).__name__}: {error}"
            log.error("study: run %s failed:\n%s", name, traceback.format_exc())
    rows = []
    for name in study.runs:
        row = read_run(study.runs[name].out, name)
        if name in errors:
            row.status, row.error = "failed", errors[name]
        rows.append(row)
    write_results(study.out, rows, f"Study {study.name}")
    log.info("study: results in %s\n%s", study.out / "results.md", markdown_table(rows))
    return rows
