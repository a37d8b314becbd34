"""Video-level metrics: views averaged per video, top-k, mean class accuracy, their files."""
from __future__ import annotations

import csv
import json

import numpy as np
import torch

from evl_cache.decoder.metrics import (
    average_views,
    classification_metrics,
    plot_confusion,
    plot_curves,
    write_per_class_csv,
)


def test_views_are_averaged_per_video():
    probabilities = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    logits = torch.log(probabilities)
    videos, labels = torch.tensor([7, 3, 7, 3]), torch.tensor([1, 0, 1, 0])
    scores = average_views(probabilities, logits, videos, labels)
    assert scores["videos"].tolist() == [3, 7] and scores["labels"].tolist() == [0, 1]
    np.testing.assert_allclose(scores["probabilities"], [[0.45, 0.55], [0.55, 0.45]], rtol=1e-6)
    np.testing.assert_allclose(scores["logits"][0], logits[[1, 3]].mean(0), rtol=1e-6)


def test_top1_top5_and_mean_class_accuracy():
    # 3 videos of class 0 (2 right), 1 of class 1 (right): top-1 3/4, but mean class accuracy (2/3 + 1) / 2
    probabilities = np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9]])
    metrics = classification_metrics(probabilities, np.array([0, 0, 0, 1]), num_classes=2)
    assert metrics["top1"] == 0.75 and metrics["top5"] == 1.0
    assert abs(metrics["mean_class_accuracy"] - (2 / 3 + 1) / 2) < 1e-12
    assert metrics["confusion"].tolist() == [[2, 1], [0, 1]]
    three = classification_metrics(np.eye(3)[[1, 1]], np.array([0, 2]), num_classes=3)
    assert three["per_class_accuracy"] == [0.0, 0.0, 0.0] and three["mean_class_accuracy"] == 0.0


def test_the_files_are_written(tmp_path):
    metrics = classification_metrics(np.array([[0.6, 0.4], [0.2, 0.8]]), np.array([0, 0]), num_classes=2)
    write_per_class_csv(tmp_path / "per_class.csv", metrics, ["walk", "run"])
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert [(r["class"], r["videos"], r["correct"]) for r in rows] == [("walk", "2", "1"), ("run", "0", "0")]
    plot_confusion(tmp_path / "confusion.png", metrics["confusion"], ["walk", "run"])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"event": "epoch", "epoch": e, "train_loss": 1.0 / (e + 1), "train_top1": 0.5, "val_top1": 0.4,
         "val_top5": 1.0, "lr": 1e-3}) + "\n" for e in range(3)))
    plot_curves(tmp_path / "curve.png", tmp_path / "metrics.jsonl")
    for name in ("confusion.png", "curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
