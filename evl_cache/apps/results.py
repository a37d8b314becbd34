"""A results table from finished run folders: one row per run, the options that differ, the metrics.

Every figure comes from the run's own files (config.json, metrics.jsonl, weights), so the table of a
study and the runs it summarises can never disagree.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from ..config import option
from ..decoder.train import RESUMABLE_CHANGES
from ..errors import EvlCacheError

# Options that do not change what a run learns: never shown as a difference.
NOT_DIFFERENCES = {"features", "out"} | RESUMABLE_CHANGES


@dataclass
class CompareConfig:
    """Options of `evl-cache compare`."""
    runs: list[Path] = option([], "run folders", argument=True)


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


def _cells(row: RunRow, keys: list[str]) -> list[str]:
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
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(row, keys)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[RunRow]) -> None:
    """results.md, results.csv and results.png (top-1 per run) in `out`."""
    keys = differing_options(rows)
    (out / "results.md").write_text(markdown_table(rows))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(table_header(keys))
        writer.writerows(_cells(row, keys) for row in rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rows) + 2), 4))
    ax.bar([row.name for row in rows], [row.top1 or 0 for row in rows])
    ax.set_ylabel("validation top-1")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)


def compare(config: CompareConfig) -> list[RunRow]:
    """The results table's rows of finished (or unfinished) run folders, for `markdown_table`."""
    if not config.runs:
        raise EvlCacheError("give one or more run folders")
    return [read_run(run) for run in config.runs]
