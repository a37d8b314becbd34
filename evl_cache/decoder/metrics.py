"""Video-level metrics: views averaged per the protocol, top-k, mean class accuracy, and their files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(4 + 0.25 * len(class_names), 40)
    fig, ax = plt.subplots(figsize=(size, size))
    normalised = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    if len(class_names) <= 60:
        ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: Path, metrics_jsonl: Path) -> None:
    """Training loss and validation top-1 per epoch, from the run's metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if r.get("event") == "epoch"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], marker="o")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    val = [r for r in epochs if "val_top1" in r]
    right.plot([r["epoch"] for r in val], [r["val_top1"] for r in val], marker="o", label="top-1")
    right.plot([r["epoch"] for r in val], [r["val_top5"] for r in val], marker="o", label="top-5")
    right.set_xlabel("epoch")
    right.set_ylabel("validation accuracy")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
