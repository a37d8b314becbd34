"""The `evl-cache` command: a thin shell over the functions `import evl_cache` gives.

Each command builds its config dataclass from its flags over an optional `--config` TOML file, calls
the function, and prints the result. An `EvlCacheError` becomes a one-line message with exit code 1;
any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from . import (
    CompareConfig,
    DemoConfig,
    EvalConfig,
    ExplainConfig,
    ExportConfig,
    ExtractConfig,
    FinetuneConfig,
    ImportConfig,
    InfoConfig,
    PredictConfig,
    StudyConfig,
    TrainConfig,
    VerifyConfig,
    VifiExportConfig,
    VifiImportConfig,
    ZeroShotConfig,
    compare,
    evaluate,
    explain,
    export_evl,
    export_vificlip,
    extract,
    finetune,
    import_evl,
    import_vificlip,
    info,
    plan,
    predict,
    run_demo,
    run_study,
    train,
    verify,
    zeroshot,
)
from .apps.predict import predicted_class_names
from .apps.results import markdown_table
from .apps.zeroshot import prompt_description
from .cache.info import format_info
from .cache.plan import CachePlan, format_plan
from .config import config_command
from .distributed import is_main_process, leave_process_group
from .errors import EvlCacheError


def _setup_logging(verbose: bool) -> None:
    """Plain, greppable lines on stderr. open_clip logs its steps on the root logger: warnings only."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: verbose or record.name != "root" or record.levelno >= logging.WARNING)
    for noisy in ("huggingface_hub", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.version_option(package_name="evl-cache")
def main(verbose: bool) -> None:
    """Train EVL video models on frozen CLIP features, extracted once into a cache."""
    _setup_logging(verbose)


def command(name: str, cls: type, section: str | None = None, json_output: bool = False) -> Callable:
    """Register a command: a flag per field of `cls` plus `--config FILE` (its [section] table, the
    command's name by default), and `--json` if asked."""
    def decorate(function: Callable) -> Callable:
        body = click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")(function) \
            if json_output else function
        return main.command(name, help=function.__doc__)(_user_errors(config_command(cls, section or name)(body)))
    return decorate


def _user_errors(function: Callable) -> Callable:
    """Run a command (building its config included); a user error becomes one line and exit code 1."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with logging_redirect_tqdm():
                return function(*args, **kwargs)
        except EvlCacheError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        finally:
            leave_process_group()
    return wrapper


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _without_confusion(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("per_class_accuracy", "confusion")}


@command("extract", ExtractConfig)
def extract_command(config: ExtractConfig) -> None:
    """Run the frozen CLIP backbone once over every video and write the feature cache (resumable)."""
    result = extract(config)
    if isinstance(result, CachePlan):
        click.echo(format_plan(result))
    elif is_main_process():
        click.echo(result.line())


@command("plan", ExtractConfig, section="extract", json_output=True)
def plan_command(config: ExtractConfig, as_json: bool) -> None:
    """Before extracting: the cache's size per split for every storage option, what an epoch reads, and
    how long the target disk takes to read it (nothing is decoded, no weights are loaded)."""
    result = plan(config)
    _echo_json(result.to_dict()) if as_json else click.echo(format_plan(result))


@command("train", TrainConfig)
def train_command(config: TrainConfig) -> None:
    """Train the EVL decoder and head from a cache, evaluating on its validation split every epoch."""
    summary = train(config)
    if is_main_process():
        click.echo(summary.line())


@command("eval", EvalConfig, json_output=True)
def eval_command(config: EvalConfig, as_json: bool) -> None:
    """Evaluate a trained run on a cache (its own by default): top-1, top-5, mean class accuracy."""
    metrics = evaluate(config)
    if as_json:
        _echo_json(_without_confusion(metrics))
    else:
        click.echo(f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  mean class accuracy "
                   f"{metrics['mean_class_accuracy']:.4f}  ({metrics['videos']} videos)")


@command("zeroshot", ZeroShotConfig, json_output=True)
def zeroshot_command(config: ZeroShotConfig, as_json: bool) -> None:
    """CLIP zero-shot accuracy from the cached frame embeddings and class-name prompts (no training)."""
    result = zeroshot(config)
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"zero-shot top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  mean class accuracy "
                   f"{result['mean_class_accuracy']:.4f}  ({result['videos']} videos, {result['classes']} classes, "
                   f"{prompt_description(result)})")


@command("predict", PredictConfig, json_output=True)
def predict_command(config: PredictConfig, as_json: bool) -> None:
    """Classify new videos with a run (backbone and decoder online, the run's sampling and views)."""
    predictions = predict(config)
    class_names = predicted_class_names(config)
    if as_json:
        _echo_json([{"path": p.path, "error": p.error, "classes": class_names, "probabilities": p.probabilities,
                     "logits": p.logits} for p in predictions])
    for p in predictions:
        if p.error:
            click.echo(f"{p.path}: error: {p.error}", err=True)
        elif not as_json:
            top = ", ".join(f"{name} {prob:.3f}" for name, prob in p.top(class_names, config.topk))
            click.echo(f"{p.path}: {top}")
    if predictions and all(p.error for p in predictions):
        click.echo(f"error: no video could be predicted ({len(predictions)} failed)", err=True)
        sys.exit(1)


@command("explain", ExplainConfig)
def explain_command(config: ExplainConfig) -> None:
    """Show what a run looks at: per video and view, the decoder's attention over each frame's patches (per
    layer and their mean), the best matches in the adjacent frames, the top classes; as PNGs and one page per
    video that works offline, with an index page. New videos run through the backbone; with --features, videos
    of a cache are read from it."""
    summary = explain(config)
    for source, error in summary.errors.items():
        click.echo(f"{source}: error: {error}", err=True)
    if not summary.pages:
        click.echo(f"error: no video could be explained ({len(summary.errors)} failed)", err=True)
        sys.exit(1)
    click.echo(summary.line())


@command("import-evl", ImportConfig)
def import_evl_command(config: ImportConfig) -> None:
    """Turn a checkpoint of the EVL authors' release into a run that eval and predict accept."""
    click.echo(f"import-evl: wrote run {import_evl(config)}")


@command("import-vificlip", VifiImportConfig)
def import_vificlip_command(config: VifiImportConfig) -> None:
    """Convert a ViFi-CLIP checkpoint into an open_clip weights file for extract --pretrained."""
    click.echo(import_vificlip(config).line())


@command("finetune", FinetuneConfig)
def finetune_command(config: FinetuneConfig) -> None:
    """Fine-tune CLIP's image and text towers on videos, ViFi-CLIP's way (or, with --tune none and prompt tokens,
    learn only prompts: bridge and prompt), decoding clips online; writes RUN/towers.pt for extract --pretrained."""
    summary = finetune(config)
    if is_main_process():
        click.echo(summary.line())


@command("export-vificlip", VifiExportConfig)
def export_vificlip_command(config: VifiExportConfig) -> None:
    """Write a weights file of finetune or import-vificlip as a ViFi-CLIP checkpoint (its code loads it with
    MODEL.RESUME)."""
    click.echo(f"export-vificlip: wrote {export_vificlip(config)}")


@command("export-evl", ExportConfig)
def export_evl_command(config: ExportConfig) -> None:
    """Write a run's decoder and head in the EVL authors' checkpoint format."""
    click.echo(f"export-evl: wrote {export_evl(config)}")


@command("run", StudyConfig)
def run_command(config: StudyConfig) -> None:
    """Run a study recipe: extract once, train and evaluate every run, write a results table."""
    result = run_study(config)
    if isinstance(result, str):
        click.echo(result)
        return
    failed = [row.name for row in result if row.status == "failed"]
    click.echo(f"study: {len(result) - len(failed)} runs ok, {len(failed)} failed; results in "
               f"{result[0].path.parent.parent if result else '.'}/results.md")


@command("compare", CompareConfig)
def compare_command(config: CompareConfig) -> None:
    """Print the results table (options that differ, top-1, top-5, ...) for finished runs; with --out, also
    write it with every run's curves and confusion matrix as results.html."""
    click.echo(markdown_table(compare(config)), nl=False)
    if config.out is not None:
        click.echo(f"compare: results.md, results.csv, results.png and results.html in {config.out}")


@command("demo", DemoConfig)
def demo_command(config: DemoConfig) -> None:
    """Make a sample video dataset, extract it, train EVL and a no-temporal ablation, and evaluate."""
    results = run_demo(config)
    click.echo("\n".join(f"demo: {line}" for line in results.table()))


@command("info", InfoConfig, json_output=True)
def info_command(config: InfoConfig, as_json: bool) -> None:
    """Show what a cache holds: backbone, blocks, sampling, splits, statuses, classes, size."""
    described = info(config)
    _echo_json(described) if as_json else click.echo(format_info(described))


@command("verify", VerifyConfig, json_output=True)
def verify_command(config: VerifyConfig, as_json: bool) -> None:
    """Check a cache against itself: done videos' arrays readable, finite and of the right shapes, statuses
    that agree with the data, checksums recorded at write time. Exit code 1 if anything is wrong."""
    report = verify(config)
    if as_json:
        _echo_json(report.to_dict())
    else:
        for problem in report.problems:
            click.echo(f"problem: {problem.line()}")
        click.echo(report.line())
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
