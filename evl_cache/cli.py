"""The `evl-cache` command: a thin shell over the library's functions.

Each command builds its config dataclass from flags (and an optional `--config` TOML file), calls the
function, and turns `EvlCacheError` into a one-line message with exit code 1. Other exceptions are bugs
and keep their traceback.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from .apps.demo import DemoConfig, run_demo
from .apps.predict import PredictConfig, predict, predicted_class_names
from .apps.zeroshot import ZeroShotConfig, prompt_description, zeroshot
from .cache.extract import ExtractConfig, extract
from .config import build_config, click_options, load_toml
from .decoder.evaluate import EvalConfig, evaluate
from .decoder.evl_checkpoints import ImportConfig, export_evl, import_evl
from .decoder.train import TrainConfig, train
from .distributed import is_main_process
from .errors import EvlCacheError
from .towers.vificlip import VifiImportConfig, import_vificlip


def _setup_logging(verbose: bool) -> None:
    """Plain, greppable lines on stderr. open_clip logs its steps on the root logger: warnings only."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: verbose or record.name != "root" or record.levelno >= logging.WARNING)
    for noisy in ("huggingface_hub", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(function: Callable) -> Callable:
    """Run a command; a user error becomes one line on stderr and exit code 1."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with logging_redirect_tqdm():
                return function(*args, **kwargs)
        except EvlCacheError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
    return wrapper


def _config(cls: type, config_file: Path | None, section: str, options: dict) -> Any:
    base = None
    if config_file is not None:
        values = load_toml(config_file)
        base = build_config(cls, values.get(section, values))
    return build_config(cls, options, base)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.version_option(package_name="evl-cache")
def main(verbose: bool) -> None:
    """Train EVL video models on frozen CLIP features, extracted once into a cache."""
    _setup_logging(verbose)


def _extract_options(command: Callable) -> Callable:
    """The options of `extract`, shared by `plan`: a TOML file, --list, and every ExtractConfig field."""
    command = click_options(ExtractConfig)(command)
    command = click.option("--list", "list_file", type=click.Path(path_type=Path),
                           help="one list for the whole dataset (same as --train-list; a CSV split column sets "
                                "splits)")(command)
    return click.option("--config", "config_file", type=click.Path(path_type=Path),
                        help="TOML file with these options (its [extract] table, or top level); flags override "
                             "it")(command)


def _extract_config(config_file: Path | None, list_file: Path | None, options: dict) -> ExtractConfig:
    if list_file is not None:
        options["train_list"] = options.get("train_list") or list_file
    return _config(ExtractConfig, config_file, "extract", options)


def _print_plan(config: ExtractConfig, probe_mb: float, as_json: bool) -> None:
    from .cache.plan import format_plan, plan_cache
    cache_plan = plan_cache(config, probe_mb)
    click.echo(json.dumps(cache_plan.to_dict(), indent=2) if as_json else format_plan(cache_plan))


@main.command("extract")
@_extract_options
@click.option("--dry-run", is_flag=True, help="print the plan (as `evl-cache plan` does) and extract nothing")
@user_errors
def extract_command(config_file: Path | None, list_file: Path | None, dry_run: bool, **options: Any) -> None:
    """Run the frozen CLIP backbone once over every video and write the feature cache (resumable)."""
    config = _extract_config(config_file, list_file, options)
    if dry_run:
        _print_plan(config, 256, as_json=False)
        return
    summary = extract(config)
    if is_main_process():
        click.echo(summary.line())


@main.command("plan")
@_extract_options
@click.option("--probe-mb", type=float, default=256, show_default=True,
              help="size of the read probe written in the folder of --out (or here); 0: no probe")
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@user_errors
def plan_command(config_file: Path | None, list_file: Path | None, probe_mb: float, as_json: bool,
                 **options: Any) -> None:
    """Before extracting: the cache's size per split for every storage option, what an epoch reads, and
    how long the target disk takes to read it (nothing is decoded, no weights are loaded)."""
    _print_plan(_extract_config(config_file, list_file, options), probe_mb, as_json)


@main.command("train")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML file with these options (its [train] table, or top level); flags override it")
@click_options(TrainConfig)
@user_errors
def train_command(config_file: Path | None, **options: Any) -> None:
    """Train the EVL decoder and head from a cache, evaluating on its validation split every epoch."""
    summary = train(_config(TrainConfig, config_file, "train", options))
    if is_main_process():
        click.echo(summary.line())


@main.command("eval")
@click_options(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@user_errors
def eval_command(as_json: bool, **options: Any) -> None:
    """Evaluate a trained run on a cache (its own by default): top-1, top-5, mean class accuracy."""
    metrics = evaluate(build_config(EvalConfig, options))
    if as_json:
        click.echo(json.dumps({k: v for k, v in metrics.items() if k != "per_class_accuracy"}, indent=2))
    else:
        click.echo(f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  mean class accuracy "
                   f"{metrics['mean_class_accuracy']:.4f}  ({metrics['videos']} videos)")


@main.command("zeroshot")
@click_options(ZeroShotConfig)
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@user_errors
def zeroshot_command(as_json: bool, **options: Any) -> None:
    """CLIP zero-shot accuracy from the cached frame embeddings and class-name prompts (no training)."""
    result = zeroshot(build_config(ZeroShotConfig, options))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"zero-shot top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  mean class accuracy "
                   f"{result['mean_class_accuracy']:.4f}  ({result['videos']} videos, {result['classes']} classes, "
                   f"{prompt_description(result)})")


@main.command("predict")
@click.argument("videos", nargs=-1, required=True)
@click_options(PredictConfig)
@click.option("--json", "as_json", is_flag=True, help="print per-video probabilities and logits as JSON")
@user_errors
def predict_command(videos: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Classify new videos with a run (backbone and decoder online, the run's sampling and views)."""
    config = build_config(PredictConfig, {**options, "videos": list(videos)})
    predictions = predict(config)
    class_names = predicted_class_names(config)
    if as_json:
        click.echo(json.dumps([{"path": p.path, "error": p.error, "classes": class_names,
                                "probabilities": p.probabilities, "logits": p.logits} for p in predictions],
                              indent=2))
        return
    for p in predictions:
        if p.error:
            click.echo(f"{p.path}: error: {p.error}", err=True)
        else:
            top = ", ".join(f"{name} {prob:.3f}" for name, prob in p.top(class_names, config.topk))
            click.echo(f"{p.path}: {top}")


@main.command("import-evl")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click_options(ImportConfig)
@user_errors
def import_evl_command(checkpoint: Path, **options: Any) -> None:
    """Turn a checkpoint of the EVL authors' release into a run that eval and predict accept."""
    out = import_evl(build_config(ImportConfig, {**options, "checkpoint": checkpoint}))
    click.echo(f"import-evl: wrote run {out}")


@main.command("import-vificlip")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click_options(VifiImportConfig)
@user_errors
def import_vificlip_command(checkpoint: Path, **options: Any) -> None:
    """Convert a ViFi-CLIP checkpoint into an open_clip weights file for extract --pretrained."""
    click.echo(import_vificlip(build_config(VifiImportConfig, {**options, "checkpoint": checkpoint})).line())


@main.command("export-evl")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="checkpoint file to write")
@click.option("--weights", type=click.Choice(["best", "last"]), default="best", show_default=True)
@user_errors
def export_evl_command(run: Path, out: Path, weights: str) -> None:
    """Write a run's decoder and head in the EVL authors' checkpoint format."""
    click.echo(f"export-evl: wrote {export_evl(run, out, weights)}")


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--only", multiple=True, help="run only this named run (repeatable)")
@click.option("--dry-run", is_flag=True, help="print what would run, the cache size it needs, and what exists")
@user_errors
def run_command(recipe: Path, only: tuple[str, ...], dry_run: bool) -> None:
    """Run a study recipe: extract once, train and evaluate every run, write a results table."""
    from .apps.study import load_study, plan, run_study
    study = load_study(recipe)
    if dry_run:
        click.echo(plan(study))
        return
    rows = run_study(study, list(only) or None)
    failed = [row.name for row in rows if row.status == "failed"]
    click.echo(f"study: {len(rows) - len(failed)} runs ok, {len(failed)} failed; results in {study.out}/results.md")


@main.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@user_errors
def compare_command(runs: tuple[Path, ...]) -> None:
    """Print the results table (options that differ, top-1, top-5, ...) for finished runs."""
    from .apps.results import markdown_table, read_run
    click.echo(markdown_table([read_run(run) for run in runs]), nl=False)


@main.command("demo")
@click_options(DemoConfig)
@user_errors
def demo_command(**options: Any) -> None:
    """Make a sample video dataset, extract it, train EVL and a no-temporal ablation, and evaluate."""
    results = run_demo(build_config(DemoConfig, options))
    click.echo("demo: " + ", ".join(f"{name} val top-1 {top1:.3f}" for name, top1 in results.items()))


@main.command("info")
@click.argument("cache")  # a path or an fsspec URL
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@click.option("--failed", is_flag=True, help="list failed videos with their reasons")
@user_errors
def info_command(cache: str, as_json: bool, failed: bool) -> None:
    """Show what a cache holds: backbone, blocks, sampling, splits, statuses, classes, size."""
    from .cache.info import cache_info, format_info
    info = cache_info(cache, failed=failed)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))


@main.command("verify")
@click.argument("cache")  # a path or an fsspec URL
@click.option("--repair", is_flag=True, help="mark the videos with problems pending, so the next extract redoes them")
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@user_errors
def verify_command(cache: str, repair: bool, as_json: bool) -> None:
    """Check a cache against itself: done videos' arrays readable, finite and of the right shapes, statuses
    that agree with the data, checksums recorded at write time. Exit code 1 if anything is wrong."""
    from .cache.verify import verify
    report = verify(cache, repair=repair)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            click.echo(f"problem: {problem.line()}")
        click.echo(report.line())
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
