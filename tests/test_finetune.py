"""`evl-cache finetune`: a short fine-tune learns beyond the frozen towers' zero-shot; only what --tune names
changes; bridge and prompt changes only the prompts; the written towers extract, zero-shot and export; a
killed run resumes to the same weights; base-to-novel and few-shot runs; refusals in one line."""
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_trained_alike
from safetensors.torch import load_file
from sigkill import kill_at_random_points, time_work

import evl_cache.tuning.finetune as finetune_module
from evl_cache.apps.zeroshot import ZeroShotConfig, zeroshot
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cli import main
from evl_cache.errors import EvlCacheError
from evl_cache.towers.backbone import load_clip
from evl_cache.towers.vificlip import VifiExportConfig, VifiImportConfig, export_vificlip, import_vificlip
from evl_cache.tuning.finetune import FinetuneConfig, finetune
from evl_cache.video.synthetic import ShapeClass, make_sample_dataset

TINY = dict(model="EVL-Tiny", pretrained="none", frames=4, workers=0, warmup_epochs=1)
VIFI_EXTRACT = dict(model="EVL-Tiny", sampling="vifi", frames=4, eval_views=1, resize=36, blocks=0, workers=0,
                    mean="0.485,0.456,0.406", std="0.229,0.224,0.225")
# Four classes told apart by colour (and shape) only: an appearance dataset, large shapes
APPEARANCE = {name: ShapeClass(shape, colour, "still", side_range=(0.6, 0.9)) for name, shape, colour in (
    ("red_circle", "circle", (220, 40, 40)), ("blue_circle", "circle", (40, 60, 220)),
    ("yellow_square", "square", (240, 200, 40)), ("green_square", "square", (40, 200, 60)))}


@pytest.fixture(scope="module")
def appearance_videos(tmp_path_factory):
    """6 training and 3 validation videos of each of the four APPEARANCE classes."""
    root = tmp_path_factory.mktemp("appearance")
    return make_sample_dataset(root, APPEARANCE, {"train": 6, "val": 3}, num_frames=16, size=(40, 52))


def base_state(seed=0):
    clip, _ = load_clip("EVL-Tiny", "none", seed=seed)
    return clip.state_dict()


def towers_file(path):
    return torch.load(path, weights_only=True)


def zeroshot_top1(videos, weights, tmp_path, name):
    """extract the validation videos with `weights` as the run evaluates them, then zeroshot with the
    run's template (the written file's learned context, if it has one)."""
    cache = tmp_path / f"{name}.zarr"
    extract(ExtractConfig(out=cache, videos=videos, pretrained=str(weights), **VIFI_EXTRACT))
    record = towers_file(weights)["vifi_clip"] if str(weights) != "none" else {}
    templates = None
    if "text_context" not in record:
        templates = tmp_path / f"{name}_templates.txt"
        templates.write_text("a photo of a {}.\n")
    return zeroshot(ZeroShotConfig(features=cache, templates=templates, workers=0))["top1"]


def test_a_short_finetune_learns_beyond_the_frozen_towers_zero_shot(appearance_videos, tmp_path):
    """ViFi-CLIP's recipe (mixup, cutmix, its augmentation, label smoothing) on random tiny towers: the loss
    falls, validation top-1 rises far above the frozen towers' zero-shot, and the written towers, extracted
    and zero-shot, score what the run's own evaluation scored."""
    out = tmp_path / "run"
    summary = finetune(FinetuneConfig(out=out, videos=appearance_videos, epochs=5, batch_size=4, lr=3e-4, **TINY))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["event"] for r in records] == ["start"] + ["epoch"] * 5 + ["summary"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    frozen = zeroshot_top1(appearance_videos, "none", tmp_path, "frozen")
    assert summary.start["top1"] == pytest.approx(frozen, abs=1 / 12)  # the run's start is the frozen zero-shot
    assert summary.final["top1"] >= 0.6 and summary.final["top1"] >= frozen + 0.3  # 12 val videos, chance 0.25
    assert summary.towers == out / "towers.pt" and "--pretrained" in summary.line()
    best = max(epochs, key=lambda r: r["val_top1"])["val_top1"]
    assert zeroshot_top1(appearance_videos, out / "towers.pt", tmp_path, "tuned") == pytest.approx(best, abs=1 / 12)
    for name in ("config.json", "best.safetensors", "last.safetensors", "curve.png", "eval_val.json",
                 "per_class_val.csv", "confusion_val.png"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["inputs"]["videos"] == {"train": 24, "val": 12} and config["finetune"]["tune"] == "both"


@pytest.mark.parametrize("tune, changes", [("image", ("visual.",)), ("text", ("transformer.", "ln_final.",
                                                                            "positional_embedding",
                                                                            "text_projection"))])
def test_only_what_tune_names_changes(sample_videos, tmp_path, tune, changes):
    out = tmp_path / tune
    finetune(FinetuneConfig(out=out, videos=sample_videos, tune=tune, epochs=1, batch_size=4, lr=1e-3,
                            evaluate_first=False, weights="last", **TINY))
    written, base = towers_file(out / "towers.pt")["state_dict"], base_state()
    assert written.keys() == base.keys()
    changed = {k for k in base if not torch.equal(written[k], base[k])}
    assert changed and all(k.startswith(changes) for k in changed)  # the rest bit-identical
    assert "token_embedding.weight" not in changed and "logit_scale" not in changed
    saved = load_file(out / "last.safetensors")  # the run saves what trains, nothing frozen
    assert saved and all(("visual." if tune == "image" else "prompts.tower.") in k for k in saved)


def test_bridge_and_prompt_changes_only_the_prompts_and_its_file_extracts_zero_shots_and_exports(
        sample_videos, tmp_path):
    out = tmp_path / "prompted"
    result = CliRunner().invoke(main, ["finetune", "--out", str(out), "--videos", str(sample_videos), "--tune", "none",
                                       "--text-prompt-tokens", "3", "--text-prompt-depth", "2",
                                       "--vision-prompt-tokens", "2", "--vision-prompt-depth", "3", "--epochs", "2",
                                       "--batch-size", "4", "--lr", "3e-3", "--weights", "last", "--model", "EVL-Tiny",
                                       "--pretrained", "none", "--frames", "4", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("finetune: 2 epochs, 6 steps")
    written = towers_file(out / "towers.pt")
    base = base_state()
    assert all(torch.equal(written["state_dict"][k], base[k]) for k in base)  # the towers, bit-identical
    assert {tower: sorted(blocks) for tower, blocks in written["prompts"].items()} == {"image": [0, 1, 2], "text": [1]}
    record = written["vifi_clip"]
    assert record["text_context"].shape == (3, 32) and record["context_prefix"] == "a photo of a"
    assert record["tune"] == "none" and record["trained_by"] == "evl-cache finetune"
    tokenizer_ids = __import__("open_clip").get_tokenizer("EVL-Tiny")(["a photo of a"])[0, 1:4]
    assert not torch.equal(record["text_context"], base["token_embedding.weight"][tokenizer_ids])  # it learned
    final = json.loads((out / "eval_val.json").read_text())["top1"]
    assert zeroshot_top1(sample_videos, out / "towers.pt", tmp_path, "prompted") == pytest.approx(final, abs=1 / 8)
    exported = export_vificlip(VifiExportConfig(towers=out / "towers.pt", out=tmp_path / "vifi.pth"))
    checkpoint = torch.load(exported, weights_only=True)
    assert checkpoint["config"]["TRAINER"]["ViFi_CLIP"] == {
        "CTX_INIT": "a photo of a", "N_CTX_TEXT": 3, "N_CTX_VISION": 2, "PROMPT_DEPTH_TEXT": 2,
        "PROMPT_DEPTH_VISION": 3, "PROMPT_MODEL": True}
    assert "module.image_encoder.VPT" in checkpoint["model"] and "module.prompt_learner.ctx" in checkpoint["model"]
    import_vificlip(VifiImportConfig(checkpoint=exported, out=tmp_path / "back.pt", base=str(out / "towers.pt"),
                                     model="EVL-Tiny"))
    back = towers_file(tmp_path / "back.pt")  # ViFi-CLIP's layout read back: the same towers and prompts
    assert all(torch.equal(back["state_dict"][k], v) for k, v in written["state_dict"].items())
    assert all(torch.equal(back["prompts"][t][b], v) for t, blocks in written["prompts"].items()
               for b, v in blocks.items())
    assert torch.equal(back["vifi_clip"]["text_context"], record["text_context"])


def _checkpoints_copied(out, copies, monkeypatch):
    """Copy the run folder after each epoch's checkpoint, as a kill just after it would leave it."""
    save = finetune_module.save_checkpoint

    def copying(run, model, state):
        save(run, model, state)
        copies.append(out.parent / f"after_epoch_{state['epoch']}")
        shutil.copytree(out, copies[-1])

    monkeypatch.setattr(finetune_module, "save_checkpoint", copying)


def test_a_run_killed_after_an_epoch_resumes_to_the_same_weights(sample_videos, tmp_path, monkeypatch):
    config = FinetuneConfig(out=tmp_path / "run", videos=sample_videos, epochs=2, batch_size=4, lr=1e-3, **TINY)
    copies = []
    _checkpoints_copied(config.out, copies, monkeypatch)
    finetune(config)
    monkeypatch.undo()
    reference = tmp_path / "reference"
    config.out.rename(reference)
    copies[0].rename(config.out)  # the run as a kill after its first epoch left it (plus a stray partial file)
    (config.out / "towers.pt.partial").write_bytes(b"half")
    summary = finetune(dataclasses.replace(config, resume=True))
    _assert_resumed_like(config.out, reference)
    assert summary.start["top1"] == json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])["val_top1"]
    with pytest.raises(EvlCacheError, match="cannot resume with different options \\(lr: run has 0.001"):
        finetune(dataclasses.replace(config, resume=True, lr=0.1))


def _assert_resumed_like(out, reference):
    for name in ("last.safetensors", "best.safetensors"):
        resumed, expected = load_file(out / name), load_file(reference / name)
        assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
    written, expected = towers_file(out / "towers.pt"), towers_file(reference / "towers.pt")
    assert all(torch.equal(written["state_dict"][k], v) for k, v in expected["state_dict"].items())
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events == ["start", "epoch", "epoch", "summary"]


def _cli_args(videos, out):
    return ["finetune", "--videos", str(videos), "--out", str(out), "--model", "EVL-Tiny", "--pretrained", "none",
            "--frames", "4", "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "1",
            "--workers", "1"]


def _start(videos, out):
    return subprocess.Popen([sys.executable, "-m", "evl_cache.cli"] + _cli_args(videos, out),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _finished(out):
    metrics = out / "metrics.jsonl"
    return metrics.exists() and '"summary"' in metrics.read_text()


@pytest.mark.slow
def test_random_kills_resume_to_the_same_weights(sample_videos, tmp_path):
    """SIGKILLs at seeded random points of real `evl-cache finetune` processes (decoding in a worker), then
    --resume: the uninterrupted run's weights and towers, one metrics line per epoch."""
    torch.set_num_threads(1)
    reference = tmp_path / "reference"
    seconds = time_work(_start(sample_videos, reference), reference.exists, lambda: _finished(reference))
    outs = {seed: tmp_path / f"seed{seed}" for seed in range(4)}
    killed = {}
    for pair in ((0, 1), (2, 3)):
        starts = {s: functools.partial(_start, sample_videos, outs[s]) for s in pair}
        killed.update(kill_at_random_points(starts, lambda s: outs[s].exists(), lambda s: not _finished(outs[s]),
                                            seconds))
    assert sum(killed.values()) >= 2, f"too few kills landed before the work was done: {killed}"
    for seed, out in outs.items():
        result = CliRunner().invoke(main, _cli_args(sample_videos, out) + ["--resume"])
        assert result.exit_code == 0, (seed, result.output)
        for name in ("last.safetensors", "best.safetensors"):
            resumed, expected = load_file(out / name), load_file(reference / name)
            assert all(torch.equal(resumed[k], expected[k]) for k in expected), (seed, name)
        events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert events == ["start", "epoch", "epoch", "epoch", "summary"], seed


@pytest.mark.slow  # starts a torchrun job
def test_two_processes_under_torchrun_train_what_one_process_trains(sample_videos, tmp_path):
    """DDP over 2 processes (gloo), each step's global batch split into 2 micro-batches (no_sync on the
    first): the weights and the evaluation of one process, up to the order of float sums. Without
    mixup and cutmix, whose draws are each process's own."""
    def args(out):
        return ["finetune", "--videos", str(sample_videos), "--out", str(out), "--model", "EVL-Tiny", "--pretrained",
                "none", "--frames", "4", "--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3",
                "--warmup-epochs", "1", "--mixup", "0", "--cutmix", "0", "--workers", "0"]

    assert CliRunner().invoke(main, args(tmp_path / "one")).exit_code == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29500 + os.getpid() % 1000), "-m", "evl_cache.cli", *args(tmp_path / "two")]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(tmp_path / run / "last.safetensors") for run in ("one", "two"))
    base = base_state()
    assert one.keys() == two.keys() and any(not torch.equal(one[k], base[k]) for k in one)  # it trained
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("one", "two")]
    # the attention's key bias has no true gradient (softmax ignores it): float noise only, so AdamW moves
    # every value of it; it stays out, the rest is compared
    for key in [key for key in one if key.endswith("attn.in_proj_bias")]:
        width = len(one[key]) // 3
        one[key], two[key] = (torch.cat([bias[:width], bias[2 * width:]]) for bias in (one[key], two[key]))
    assert_trained_alike(two, one, lr=1e-3, steps=records[0][-1]["steps"])
    for a, b in zip(*records):
        assert a["event"] == b["event"] and a.get("val_top1") == b.get("val_top1")
        if a["event"] == "epoch":
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_base_to_novel_few_shot_runs_report_novel_classes(sample_videos, tmp_path):
    base = tmp_path / "base.txt"
    base.write_text("red_still\nslide_left\n")
    out = tmp_path / "b2n"
    summary = finetune(FinetuneConfig(out=out, videos=sample_videos, base_classes=base, shots=2, epochs=1,
                                      batch_size=4, lr=1e-3, **TINY))
    config = json.loads((out / "config.json").read_text())
    assert config["class_names"] == ["red_still", "slide_left"] and config["novel_classes"] == ["blue_still",
                                                                                                "slide_right"]
    assert config["inputs"]["videos"] == {"train": 4, "val": 4, "val_novel": 4}
    assert "novel" in summary.final and "harmonic mean" in summary.line()
    epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert {"val_novel_top1", "val_harmonic_mean"} <= set(epoch)
    assert (out / "per_class_val_novel.csv").read_text().count("\n") == 3  # header and the two novel classes


@pytest.mark.parametrize("flags, message", [
    (["--tune", "none"], "--tune none without prompt tokens trains nothing"),
    (["--text-prompt-tokens", "4"], "use --tune none, not --tune both"),
    (["--tune", "none", "--vision-prompt-tokens", "4"], "vision prompts need text prompts too"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 must split into --grad-accum 4"),
    (["--mixup-switch-prob", "1.5"], "--mixup-switch-prob is a probability"),
    (["--mean", "1,2"], "--mean '1,2': give three comma-separated numbers"),
    (["--shots", "9"], "--shots 9: class 0 has only 3 training videos"),
])
def test_options_that_cannot_work_are_one_line_errors(sample_videos, tmp_path, flags, message):
    result = CliRunner().invoke(main, ["finetune", "--out", str(tmp_path / "run"), "--videos", str(sample_videos),
                                       "--model", "EVL-Tiny", "--pretrained", "none", *flags])
    assert result.exit_code == 1 and message in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not (tmp_path / "run" / "checkpoints").exists()


def test_a_base_with_prompts_of_its_own_is_refused(sample_videos, tmp_path):
    prompted = tmp_path / "prompted.pt"
    torch.save({"state_dict": base_state(), "prompts": {"image": {0: torch.zeros(2, 64)}}}, prompted)
    with pytest.raises(EvlCacheError, match="prompted.pt: the base weights carry learned prompts"):
        finetune(FinetuneConfig(out=tmp_path / "run", videos=sample_videos, **{**TINY, "pretrained": str(prompted)}))
