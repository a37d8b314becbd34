"""benchmarks/gpu.py in its small mode on the CPU: every phase runs and reports, and its checks hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_the_gpu_benchmark_runs_every_phase_on_a_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--work", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = [json.loads(line.split("result: ", 1)[1]) for line in result.stdout.splitlines() if "result: {" in line]
    questions = [record["question"].split(",")[0].split(":")[0] for record in records]
    assert questions == ["extraction clips/s", "cpu cache vs the CPU's", "cpu cache vs the CPU's",
                         "training clips/s from the cache (4 clips a step", "loader GB/s",
                         "fine-tuning clips/s (EVL-Tiny", "fine-tuning clips/s (EVL-Tiny",
                         "one-process torchrun (gloo) extract + train of 2 videos vs the training in this process"]
    assert all(record["ours"] > 0 and record["baseline"] > 0 for i, record in enumerate(records) if i not in (1, 2))
    assert [record["ours"] for record in records[1:3]] == [0.0, 0.0]  # the same device twice: the same cache
    assert records[-1]["details"] == {"same_cache": True, "same_weights": True}
    assert "memory: not measured on a GPU (this run is on cpu); an estimate of" in result.stdout
    assert ["activation checkpointing" in record["question"] for record in records[5:7]] == [False, True]
    assert [record["details"]["peak_memory_gb"] for record in records[5:7]] == [None, None]  # not on a CPU
    assert "GPU none" in result.stdout.splitlines()[0]
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone
