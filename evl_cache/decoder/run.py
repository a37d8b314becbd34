"""The run folder: what a run is (its config.json), the model it describes, the weights it saves and
loads, the caches it can read, and the evaluation files it holds.

A run folder holds `config.json` (the options, the head, the decoder, the feature selection and the
cache it trained on), `best.safetensors` and `last.safetensors` (the weights without the frozen text
tower, which is rebuilt from the backbone and checked by hash), `metrics.jsonl`, the evaluation files
(`eval_*.json`, `per_class_*.csv`, `confusion_*.png`), `curve.png`, and `checkpoints/` while training.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..cache.dataset import (
    CacheLoader,
    FeatureSelection,
    model_inputs,
    select_embeddings,
    select_features,
    select_final_block,
)
from ..errors import CacheError, CheckpointError, EvlCacheError
from ..towers.text import ClassPrompts, load_text_tower
from .metrics import plot_confusion, write_per_class_csv
from .model import ClipTextModel, DecoderConfig, EVLModel, TextHeadModel
from .probes import AttentiveProbe, AttentiveProbeConfig, LinearProbe, LinearProbeConfig

HEADS = ("linear", "text", "clip-text", "attentive-probe", "linear-probe")
TEXT_HEADS = ("text", "clip-text")  # the heads that score class names, so any list of them


@torch.no_grad()
def predict_views(model: torch.nn.Module, loader: CacheLoader, device: torch.device,
                  use_amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, logits, video indices, labels), one row per cached view."""
    was_training = model.training
    model.eval()
    probabilities, logits, videos, labels = [], [], [], []
    for batch in loader:
        inputs = model_inputs(batch, device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            out = model(*inputs).float()
        logits.append(out.cpu())
        probabilities.append(out.softmax(-1).cpu())
        videos.append(batch["video"])
        labels.append(batch["label"])
    model.train(was_training)
    return torch.cat(probabilities), torch.cat(logits), torch.cat(videos), torch.cat(labels)


def write_evaluation(out: Path, name: str, metrics: dict, class_names: list[str],
                     novel_names: list[str] | None = None) -> None:
    """eval_NAME.json, per_class_NAME.csv and confusion_NAME.png in the run folder; for base-to-novel
    metrics (`add_novel`) also per_class_NAME_novel.csv and confusion_NAME_novel.png."""
    summary = {k: v for k, v in metrics.items() if k != "confusion"}
    if "novel" in metrics:
        novel = metrics["novel"]
        summary["novel"] = {k: v for k, v in novel.items() if k != "confusion"}
        write_per_class_csv(out / f"per_class_{name}_novel.csv", novel, novel_names)
        plot_confusion(out / f"confusion_{name}_novel.png", novel["confusion"], novel_names)
    (out / f"eval_{name}.json").write_text(json.dumps(summary, indent=2))
    write_per_class_csv(out / f"per_class_{name}.csv", metrics, class_names)
    plot_confusion(out / f"confusion_{name}.png", metrics["confusion"], class_names)


def load_run(run: str | Path) -> dict:
    """A run folder's config.json."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise CheckpointError("not a run folder (no config.json)", run)
    return json.loads(path.read_text())


def run_head(run_config: dict) -> dict:
    """A run's head record: its kind (`HEADS`), and for the text heads their class names, novel classes
    (base-to-novel), prompt tokens, templates and what of the text tower trains."""
    return run_config.get("head") or {"kind": "linear"}


def run_class_names(run_config: dict) -> list[str]:
    """The classes a run scores by default: those it was trained on."""
    return run_head(run_config).get("class_names") or run_config["cache"]["class_names"]


def build_model(run_config: dict, class_names: list[str] | None = None, pretrained: str | None = None) -> nn.Module:
    """The model a run's config.json describes, on the CPU.

    Text and clip-text runs load CLIP's text tower from the run's backbone record (`pretrained`: a
    weights file instead of the recorded tag or file; the sha256 must match) and score `class_names`
    (default: the run's own). The EVL linear head and the probes have a fixed class list.
    """
    head = run_head(run_config)
    if head["kind"] not in TEXT_HEADS:
        check_fixed_classes(head, class_names)
        if head["kind"] == "attentive-probe":
            return AttentiveProbe(AttentiveProbeConfig(**run_config["probe"]))
        if head["kind"] == "linear-probe":
            return LinearProbe(LinearProbeConfig(**run_config["probe"]))
        decoder = dict(run_config["decoder"])
        decoder["grid"] = tuple(decoder["grid"])
        return EVLModel(DecoderConfig(**decoder))
    cache = run_config["cache"]
    tower, tokenizer = load_text_tower(cache["backbone"], cache["sampling"]["seed"], pretrained)
    prompts = ClassPrompts(tower, tokenizer, class_names or run_class_names(run_config), head["templates"],
                           head["prompt_tokens"], head["tune"] == "text")
    if head["kind"] == "text":
        return TextHeadModel(prompts)
    decoder = dict(run_config["decoder"])
    decoder["grid"] = tuple(decoder["grid"])
    return ClipTextModel(DecoderConfig(**decoder), cache["backbone"]["embed_dim"], prompts)


def check_fixed_classes(head: dict, class_names: list[str] | None) -> None:
    """Refuse another class list (`--classes`) for a head whose classes are rows of a weight matrix."""
    if class_names is not None and head["kind"] not in TEXT_HEADS:
        raise EvlCacheError(f"only text and clip-text runs score another class list (--classes); this run has "
                            f"a {head['kind']} head")


def saved_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a run saves: the state dict without the frozen parts rebuilt from the backbone."""
    rebuilt = getattr(model, "rebuilt_prefixes", ())
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(rebuilt)}


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load saved weights; every key the model saves must be there, and nothing else."""
    rebuilt = getattr(model, "rebuilt_prefixes", ())
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights and not k.startswith(rebuilt)]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the run's model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}", path)
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"weights do not fit the run's model: {str(error).splitlines()[0]}", path) from None


def run_selection(attrs: dict, run_config: dict) -> FeatureSelection:
    """What the run reads from a cache (checked against that cache's attributes)."""
    selection = run_config["selection"]
    if selection.get("embed"):
        return select_embeddings(attrs, selection["frames"], selection["frame_step"])
    if run_head(run_config)["kind"] == "attentive-probe":
        return select_final_block(attrs, selection["frames"], selection["frame_step"])
    decoder = run_config["decoder"]
    return select_features(attrs, decoder["layers"], decoder["frames"], selection["frame_step"],
                           decoder["temporal_cross_attention"])


def harmonic_mean(base: float, novel: float) -> float:
    """The base-to-novel summary of ViFi-CLIP: 2 B N / (B + N)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def add_novel(metrics: dict, novel: dict) -> dict:
    """Base metrics with the novel classes' metrics and the harmonic mean of the two top-1s."""
    return {**metrics, "novel": novel, "harmonic_mean": harmonic_mean(metrics["top1"], novel["top1"])}


def check_cache_serves_run(attrs: dict, run_config: dict, path: Path) -> None:
    """Refuse a cache whose backbone, preprocessing or classes differ from the run's. The number of crops
    may differ (like the number of temporal views): each view is still a crop of the same pixels."""
    run_cache = run_config["cache"]
    if attrs["backbone"]["weights_sha256"] != run_cache["backbone"]["weights_sha256"]:
        raise CacheError(f"backbone weights differ from the run's (sha256 {attrs['backbone']['weights_sha256'][:12]} "
                         f"vs {run_cache['backbone']['weights_sha256'][:12]}): features would not match", path)
    def pixels(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "crop"}

    if pixels(attrs["preprocessing"]) != pixels(run_cache["preprocessing"]):
        raise CacheError(f"preprocessing differs from the run's cache: {attrs['preprocessing']} vs "
                         f"{run_cache['preprocessing']}", path)
    for key in ("frames", "stride", "mode"):
        if attrs["sampling"][key] != run_cache["sampling"][key]:
            raise CacheError(f"sampling {key} is {attrs['sampling'][key]}, the run was trained on "
                             f"{run_cache['sampling'][key]}", path)
    if run_head(run_config)["kind"] not in TEXT_HEADS and attrs["class_names"] != run_cache["class_names"]:
        raise CacheError("class names differ from the run's", path)
