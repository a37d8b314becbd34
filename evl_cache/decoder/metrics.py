"""Video-level metrics: views averaged per the protocol, top-k, mean class accuracy, and their files."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch


def average_views(probabilities: torch.Tensor, logits: torch.Tensor, videos: torch.Tensor,
                  labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per video: softmax and logits averaged over its views (evl-model.md section 5)."""
    order = torch.unique(videos)
    position = {int(v): i for i, v in enumerate(order)}
    rows = torch.tensor([position[int(v)] for v in videos])
    counts = torch.zeros(len(order)).index_add_(0, rows, torch.ones(len(rows)))
    mean_prob = torch.zeros(len(order), probabilities.shape[1]).index_add_(0, rows, probabilities.float())
    mean_logit = torch.zeros(len(order), logits.shape[1]).index_add_(0, rows, logits.float())
    video_labels = torch.zeros(len(order), dtype=torch.long).index_copy_(0, rows, labels.long())
    return {"videos": order.numpy(), "probabilities": (mean_prob / counts[:, None]).numpy(),
            "logits": (mean_logit / counts[:, None]).numpy(), "labels": video_labels.numpy()}


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Top-1, top-5, mean class accuracy and the confusion matrix (rows: true, columns: predicted)."""
    ranked = np.argsort(-probabilities, axis=1)
    predicted = ranked[:, 0]
    top_k = min(5, num_classes)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    present = confusion.sum(1) > 0
    per_class = np.divide(np.diag(confusion), confusion.sum(1), out=np.zeros(num_classes), where=present)
    return {
        "videos": int(len(labels)),
        "top1": float((predicted == labels).mean()) if len(labels) else 0.0,
        "top5": float((ranked[:, :top_k] == labels[:, None]).any(1).mean()) if len(labels) else 0.0,
        "mean_class_accuracy": float(per_class[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion,
    }


def write_per_class_csv(path: Path, metrics: dict, class_names: list[str]) -> None:
    confusion = metrics["confusion"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "videos", "correct", "accuracy"])
        for i, name in enumerate(class_names):
            writer.writerow([name, int(confusion[i].sum()), int(confusion[i, i]),
                             f"{metrics['per_class_accuracy'][i]:.4f}"])


def plot_confusion(path: Path, confusion: np.ndarray, class_names: list[str]) -> None:
    """The confusion matrix, each row normalised over its true class's videos, with a colour scale and
    (up to 30 classes) each cell's video count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(class_names)
    size = min(4.5 + 0.25 * count, 40)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    normalised = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's videos")
    if count <= 60:
        fontsize = 9 if count <= 20 else 7
        ax.set_xticks(range(count), class_names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(count), class_names, fontsize=fontsize)
    if count <= 30:
        for (true, predicted), videos in np.ndenumerate(confusion):
            if videos:
                ax.text(predicted, true, str(videos), ha="center", va="center", fontsize=8,
                        color="white" if normalised[true, predicted] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix" + (" (numbers: videos)" if count <= 30 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: Path | BinaryIO, metrics_jsonl: Path) -> None:
    """Training loss and validation accuracy per epoch (counted from 1, as the log does), from the run's
    metrics.jsonl, to a file or a buffer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if r.get("event") == "epoch" and "train_loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["epoch"] + 1 for r in epochs], [r["train_loss"] for r in epochs], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="training loss")
    val = [r for r in epochs if "val_top1" in r]
    right.plot([r["epoch"] + 1 for r in val], [r["val_top1"] for r in val], marker="o", label="top-1")
    right.plot([r["epoch"] + 1 for r in val], [r["val_top5"] for r in val], marker="o", label="top-5")
    right.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy", ylim=(0, 1.05))
    right.legend()
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
