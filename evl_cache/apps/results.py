"""A results table from finished run folders: one row per run, the options that differ, the metrics;
and results.html, the page that shows them with every run's curves and confusion matrix.

Every figure comes from the run's own files (config.json, metrics.jsonl, weights, plots), so the
table of a study and the runs it summarises can never disagree.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from ..config import option
from ..decoder.metrics import plot_curves
from ..decoder.train import RESUMABLE_CHANGES
from ..errors import EvlCacheError
from .pages import embedded_image, html_page, html_table, png_bytes

# Options that do not change what a run learns: never shown as a difference.
NOT_DIFFERENCES = {"features", "out"} | RESUMABLE_CHANGES


@dataclass
class CompareConfig:
    """Options of `evl-cache compare`."""
    runs: list[Path] = option([], "run folders", argument=True)
    out: Path | None = option(None, "also write results.md, results.csv, results.png and results.html (the page "
                                    "with every run's curves and confusion matrix) into this folder")


@dataclass
class RunRow:
    """What the table shows of one run."""
    name: str
    path: Path
    options: dict = field(default_factory=dict)
    top1: float | None = None
    top5: float | None = None
    parameters: int | None = None
    train_seconds: float | None = None
    clips_per_second: float | None = None
    status: str = "finished"
    error: str = ""


def read_run(path: str | Path, name: str | None = None) -> RunRow:
    """A row from a run folder; a run without a final summary is 'unfinished'."""
    path = Path(path)
    row = RunRow(name or path.name, path)
    config_path = path / "config.json"
    if not config_path.exists():
        row.status, row.error = "missing", "no config.json"
        return row
    config = json.loads(config_path.read_text())
    row.options = dict(config.get("train") or {})
    backbone = (config.get("cache") or {}).get("backbone")
    if row.options and backbone:  # the tower, shown when runs of a study read different towers' caches
        row.options["backbone"] = f"{backbone['model']} ({backbone['pretrained']})"
    metrics = path / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    epochs = [r for r in records if r.get("event") == "epoch"]
    summary = next((r for r in reversed(records) if r.get("event") == "summary"), None)
    if summary is None:
        row.status = f"unfinished ({len(epochs)} epochs)"
    else:
        row.top1, row.top5 = summary["val_top1"], summary["val_top5"]
        row.train_seconds = sum(r["epoch_seconds"] for r in epochs)
    if epochs:
        row.clips_per_second = sum(r["train_clips_per_s"] for r in epochs) / len(epochs)
    weights = path / "last.safetensors"
    if weights.exists():
        with safe_open(weights, "pt") as handle:
            row.parameters = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return row


def differing_options(rows: list[RunRow]) -> list[str]:
    """Option names whose values are not the same in every row."""
    keys = sorted({k for row in rows for k in row.options} - NOT_DIFFERENCES)
    return [k for k in keys if len({json.dumps(row.options.get(k)) for row in rows if row.options}) > 1]


def table_cells(row: RunRow, keys: list[str]) -> list[str]:
    """One row of the results table as text: the run's name, its differing options, its figures."""
    def number(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)
    return ([row.name] + [json.dumps(row.options.get(k)) if row.options else "" for k in keys] +
            [number(row.top1, ".4f"), number(row.top5, ".4f"), number(row.parameters, "d"),
             number(row.train_seconds, ".1f"), number(row.clips_per_second, ".1f"),
             row.status + (f": {row.error}" if row.error else "")])


def table_header(keys: list[str]) -> list[str]:
    return ["run"] + keys + ["top1", "top5", "parameters", "train_s", "clips_per_s", "status"]


def markdown_table(rows: list[RunRow]) -> str:
    """The table in Markdown, ready to paste."""
    keys = differing_options(rows)
    header = table_header(keys)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in table_cells(row, keys)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _top1_chart(rows: list[RunRow]) -> bytes:
    """A bar per run: its validation top-1, written on the bar (or its status when it has none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(4, 0.8 * len(rows) + 2), 4))
    bars = axes.bar([row.name for row in rows], [row.top1 or 0 for row in rows])
    axes.bar_label(bars, [f"{row.top1:.3f}" if row.top1 is not None else row.status.split(" ")[0] for row in rows],
                   fontsize=8)
    axes.set(ylabel="validation top-1", title="validation top-1 per run", ylim=(0, 1.05))
    axes.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    return png_bytes(figure)


def _epochs(run: Path) -> list[dict]:
    """The run's per-epoch records from metrics.jsonl (none before its first epoch ends)."""
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in records if r.get("event") == "epoch"]


def _all_curves(rows: list[RunRow]) -> bytes:
    """Training loss and validation top-1 per epoch (from 1) of every run, one colour per run, on shared axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (loss, top1) = plt.subplots(1, 2, figsize=(12, 4.2))
    for row in rows:
        epochs = [r for r in _epochs(row.path) if "train_loss" in r and "val_top1" in r]
        numbers = [r["epoch"] + 1 for r in epochs]
        loss.plot(numbers, [r["train_loss"] for r in epochs], marker=".", label=row.name)
        top1.plot(numbers, [r["val_top1"] for r in epochs], marker=".", label=row.name)
    loss.set(xlabel="epoch", ylabel="training loss", title="training loss per epoch")
    top1.set(xlabel="epoch", ylabel="validation top-1", title="validation top-1 per epoch", ylim=(0, 1.05))
    for axes in (loss, top1):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    top1.legend(title="run", fontsize=8, loc="lower right")
    figure.tight_layout()
    return png_bytes(figure)


def _run_card(row: RunRow) -> str:
    """One run's own pictures: its curves and the confusion matrix of its final evaluation."""
    status = row.status + (f": {row.error}" if row.error else "")
    parts = [f"<div class=card><h3>{html.escape(row.name)}</h3>",
             f"<div class=note>{html.escape(str(row.path))} &middot; {html.escape(status)}</div>"]
    curve, confusion = row.path / "curve.png", row.path / "confusion_val.png"
    if curve.exists():
        parts.append(embedded_image(curve, f"{row.name}: loss and validation accuracy per epoch"))
    elif _epochs(row.path):  # an unfinished run: its curves so far
        buffer = io.BytesIO()
        plot_curves(buffer, row.path / "metrics.jsonl")
        parts.append(embedded_image(buffer.getvalue(), f"{row.name}: loss and validation accuracy so far"))
    if confusion.exists():
        parts.append(embedded_image(confusion, f"{row.name}: confusion matrix on the validation videos"))
    if not curve.exists() and not confusion.exists():
        parts.append("<p class=note>No confusion matrix yet: the run has not finished.</p>")
    return "\n".join(parts + ["</div>"])


def results_page(title: str, rows: list[RunRow], top1_png: bytes) -> str:
    """results.html: the table, top-1 per run, all runs' curves together, each run's own pictures."""
    keys = differing_options(rows)
    body = [html_table(table_header(keys), [table_cells(row, keys) for row in rows]),
            "<p class=note>The columns between <i>run</i> and <i>top1</i> are the options that differ between "
            "the runs. top1, top5: validation accuracy of the final weights, each video's softmax averaged over "
            "its views; train_s: training seconds; clips_per_s: training speed.</p>",
            "<h2>Top-1 per run</h2>", embedded_image(top1_png, "validation top-1 per run"),
            "<h2>Curves of all runs</h2>", embedded_image(_all_curves(rows), "loss and top-1 per epoch, all runs"),
            "<h2>Each run</h2>",
            "<p class=note>Curves: training loss, and validation top-1 and top-5, per epoch. Confusion matrix: "
            "rows are the true classes, columns the predicted ones, each row's videos as fractions.</p>",
            "<div class=cards>", *[_run_card(row) for row in rows], "</div>"]
    return html_page(title, "\n".join(body))


def write_results(out: Path, rows: list[RunRow], title: str = "Results") -> None:
    """results.md, results.csv, results.png (top-1 per run) and results.html (the page with all of it and
    every run's curves and confusion matrix) in `out`."""
    keys = differing_options(rows)
    (out / "results.md").write_text(markdown_table(rows))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(table_header(keys))
        writer.writerows(table_cells(row, keys) for row in rows)
    top1_png = _top1_chart(rows)
    (out / "results.png").write_bytes(top1_png)
    (out / "results.html").write_text(results_page(title, rows, top1_png))


def compare(config: CompareConfig) -> list[RunRow]:
    """The results table's rows of finished (or unfinished) run folders, for `markdown_table`; with
    `out`, also the results files there (`write_results`)."""
    if not config.runs:
        raise EvlCacheError("give one or more run folders")
    rows = [read_run(run) for run in config.runs]
    if config.out is not None:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        write_results(Path(config.out), rows, "Comparison of " + ", ".join(row.name for row in rows))
    return rows
