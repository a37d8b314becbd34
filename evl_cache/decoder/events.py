"""TensorBoard event files of a run (`train --tensorboard`): each epoch's scalars, in `tensorboard/`.

The events are another view of metrics.jsonl: each epoch's record is written to both. A resumed run
writes the folder again from the epochs metrics.jsonl kept (`keep_finished_epochs`), so an epoch that
a killed run logged but never checkpointed is not there twice, and any reader (not only TensorBoard,
which could purge it) sees each step once. A step is the number of epochs done (metrics.jsonl's
0-based `epoch` + 1), as the log and the plots count them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import EvlCacheError

EVENTS_FOLDER = "tensorboard"

# metrics.jsonl key -> TensorBoard tag; the groups become TensorBoard's sections.
SCALARS = {
    "train_loss": "loss/train",
    "train_top1": "accuracy/train_top1",
    "val_top1": "accuracy/val_top1",
    "val_top5": "accuracy/val_top5",
    "val_mean_class_accuracy": "accuracy/val_mean_class",
    "val_novel_top1": "accuracy/val_novel_top1",
    "val_novel_top5": "accuracy/val_novel_top5",
    "val_harmonic_mean": "accuracy/val_harmonic_mean",
    "lr": "optimisation/learning_rate",
    "train_clips_per_s": "speed/clips_per_s",
    "data_wait_share": "speed/data_wait_share",
    "epoch_seconds": "speed/epoch_seconds",
}


def check_tensorboard() -> None:
    """Refuse `--tensorboard` up front when the optional TensorBoard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise EvlCacheError("--tensorboard needs the TensorBoard package: pip install 'evl-cache[tensorboard]'") \
            from None


class EpochEvents:
    """The run's event writer: made afresh from metrics.jsonl's epochs, then one `add` per epoch."""

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(out) / EVENTS_FOLDER
        if folder.exists():
            shutil.rmtree(folder)
        self.writer = SummaryWriter(str(folder))
        metrics = Path(out) / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        for record in (json.loads(line) for line in lines if line.strip()):
            if record.get("event") == "epoch":
                self.add(record, flush=False)
        self.writer.flush()

    def add(self, record: dict, flush: bool = True) -> None:
        """Write one metrics.jsonl epoch record's scalars at step `record["epoch"] + 1` (flushed, so a
        kill after its checkpoint loses nothing)."""
        for key, tag in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["epoch"] + 1, walltime=record.get("wall_time"))
        if flush:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
