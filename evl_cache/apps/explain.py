"""`evl-cache explain`: what a run looks at in a video, as pictures and pages that work offline.

Per video and view: the frames the run samples, with each decoder layer's query attention over every
frame's patches drawn on them (heads averaged) and the mean over the layers; for the most-attended
patches of each frame, arrows to their best match in the previous and the next frame (the backbone's
adjacent-frame attention maps, averaged over the decoder's blocks); and the top classes. An attentive
probe's queries are drawn as one layer. A text-head run has no decoder: each frame's cosine similarity
with the top classes' prompts is shown instead. A linear probe is refused: it attends to nothing.

New videos run through the run's backbone as `predict` does (`OnlineModel`). Videos of a cache are read
from it with no backbone; their frames are decoded again only to draw them, when the file is still at
the cache's dataset root (otherwise the heatmaps are drawn alone and the page says why).
"""
from __future__ import annotations

import dataclasses
import html
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from ..cache.dataset import CacheDataset, CacheLoader, FeatureSelection, model_inputs
from ..cache.store import DONE, STATUS_NAMES, FeatureStore, location
from ..config import option, shared
from ..decoder.model import TextHeadModel, recording_attention
from ..decoder.run import (
    build_model,
    check_cache_serves_run,
    load_run,
    load_weights,
    run_class_names,
    run_head,
    run_selection,
)
from ..errors import CheckpointError, EvlCacheError
from ..runtime import resolve_device
from ..towers.backbone import prefix_tokens
from ..video.clips import ClipSpec, planned_frame_numbers, read_video_clips
from ..video.find import expand_video_inputs
from ..video.tars import tar_member
from .explain_pictures import Explanation, plot_attention, plot_similarities
from .pages import embedded_image, html_page, html_table
from .predict import OnlineModel

log = logging.getLogger(__name__)


@dataclass
class ExplainConfig:
    """Options of `evl-cache explain`."""
    videos: list[str] = option([], "video files, folders of videos, or list files (the run's backbone runs on "
                                   "them)", argument=True)
    run: Path = option(None, "run folder (trained, or imported with import-evl)")
    out: Path = option(None, "folder for the pictures and pages (open its index.html)")
    features: Path | None = option(None, "explain videos of this cache instead, from their cached features (no "
                                          "backbone); name them with --videos")
    cached: list[str] = option([], "with --features: a cache video to explain, by row number or its path in the "
                                   "cache (repeatable)", flag="--videos")
    topk: int = option(5, "classes shown per video")
    arrows: int = option(3, "most-attended patches per frame whose best match in the previous and the next frame "
                            "is drawn (0: none)")
    weights: str = shared("weights")
    pretrained: str | None = option(None, "backbone weights file to use instead of the run's tag/file (must have "
                                          "the run's sha256)")
    device: str = shared("device")
    decode_timeout: float = shared("decode_timeout")


@dataclass
class ExplainSummary:
    """Where the pages are, and the videos that could not be explained."""
    index: Path
    pages: list[Path]
    errors: dict[str, str]

    def line(self) -> str:
        return (f"explain: {len(self.pages)} videos explained" + (f", {len(self.errors)} failed" if self.errors else "")
                + f"; open {self.index}")


@torch.no_grad()
def look(model: torch.nn.Module, inputs: tuple, device: torch.device) -> dict[str, np.ndarray]:
    """Per view: the class probabilities and, for a decoder, each layer's attention ([V, N, T*L], heads
    averaged), or for a text head each frame's cosine with each class prompt ([V, T, K])."""
    with recording_attention(model) as recorded, \
            torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        logits = model(*inputs).float()
    seen = {"probabilities": logits.softmax(-1).cpu().numpy()}
    if isinstance(model, TextHeadModel):
        frames = F.normalize(inputs[0].float(), dim=-1)
        seen["similarities"] = (frames @ model.text().float().t()).cpu().numpy()
    else:
        seen["attention"] = torch.stack(recorded, 1).float().mean(2).cpu().numpy()
    return seen


def best_matches(maps_prev: list[torch.Tensor], maps_next: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """For each patch of frame t, the patch of frame t-1 (and of t+1) it attends to most, from the maps
    averaged over blocks: [V, T-1, P] each, row t-1 for frame t's previous, row t for its next."""
    prev = torch.stack([m.float() for m in maps_prev]).mean(0).argmax(-1)
    nxt = torch.stack([m.float() for m in maps_next]).mean(0).argmax(-1)
    return prev.cpu().numpy(), nxt.cpu().numpy()


def _explained(explanation: Explanation, model: torch.nn.Module, inputs: tuple, maps: tuple | None,
               device: torch.device) -> Explanation:
    """`explanation` with what the model sees in `inputs` (and the matches in the adjacent-frame `maps`)."""
    seen = look(model, inputs, device)
    attention = seen.get("attention")
    if attention is not None:
        views, layers = attention.shape[:2]
        frames = len(explanation.frame_numbers[0])
        attention = attention.reshape(views, layers, frames, -1)
    return dataclasses.replace(explanation, probabilities=seen["probabilities"], attention=attention,
                               similarities=seen.get("similarities"),
                               matches=best_matches(*maps) if maps is not None and attention is not None else None)


def _arrows_possible(selection: FeatureSelection, attrs: dict | None = None) -> bool:
    """Whether adjacent-frame maps pair the run's frames (and, for a cache, whether it holds them)."""
    stored = attrs is None or "maps" in attrs.get("stored", ["maps"])
    return stored and bool(selection.blocks) and selection.frame_step == 1 and selection.frames >= 2


def new_videos(config: ExplainConfig) -> Iterator[Explanation]:
    """Explanations of video files: the run's backbone and decoder online, the run's sampling and views."""
    online = OnlineModel(config.run, config.weights, config.pretrained, config.device)
    selection = online.selection
    grid = tuple(online.run_config["cache"]["backbone"]["patch_grid"])
    for path in expand_video_inputs(config.videos):
        explanation = Explanation(Path(str(path)).name, str(path), online.class_names, grid, list(selection.blocks),
                                  prefix_tokens(online.run_config["cache"]["backbone"]))
        if "://" in str(path):
            yield dataclasses.replace(explanation, error="URLs are not read: download the video and pass the file")
            continue
        clips = read_video_clips(path, "val", 0, online.clip_spec, config.decode_timeout)
        if clips.clips is None:
            yield dataclasses.replace(explanation, error=clips.error)
            continue
        numbers = planned_frame_numbers(clips.num_frames, "val", 0, online.clip_spec)
        explanation.frame_numbers = [[view[i] for i in selection.frame_indices] for view in numbers]
        explanation.frames = clips.clips[:, selection.frame_indices].permute(0, 1, 3, 4, 2).numpy()
        with_maps = config.arrows > 0 and _arrows_possible(selection)
        inputs = online.model_inputs(clips.clips, maps=with_maps or None)
        yield _explained(explanation, online.model, *_without_unread_maps(inputs, with_maps, selection.maps),
                         online.device)


def _cache_rows(given: list[str], paths: np.ndarray) -> list[int]:
    """Cache rows from row numbers or paths as the cache records them."""
    position = {str(path): row for row, path in enumerate(paths)}
    rows = []
    for text in given:
        row = int(text) if text.strip().isdigit() else position.get(text)
        if row is None or not 0 <= row < len(paths):
            raise EvlCacheError(f"--videos {text}: not a row number (0-{len(paths) - 1}) or a path of the cache")
        rows.append(row)
    return rows


def cached_frames(attrs: dict, row: int, columns: dict, timeout: float) -> tuple[np.ndarray | None, str]:
    """A cached video's views as the backbone saw them (uint8 [V, T, S, S, 3], every cached frame), decoded
    again from the file at the cache's dataset root; or None and why not."""
    root = attrs.get("dataset", {}).get("root")
    file = os.path.join(root, str(columns["path"][row])) if root else str(columns["path"][row])
    if not os.path.exists(file) and tar_member(file) is None:
        return None, f"frames not drawn: the video is not at {file} (the cache's dataset root and its path)"
    clips = read_video_clips(file, str(columns["split"][row]), row, ClipSpec.from_cache(attrs), timeout)
    if clips.clips is None:
        return None, f"frames not drawn: {file}: {clips.error}"
    if clips.num_frames != int(columns["frames"][row]):
        return None, (f"frames not drawn: {file} has {clips.num_frames} frames, the cache recorded "
                      f"{int(columns['frames'][row])}: not the file that was cached")
    return clips.clips.permute(0, 1, 3, 4, 2).numpy(), ""


def _cached_model(config: ExplainConfig, run_config: dict, device: torch.device) -> torch.nn.Module:
    """The run's model with its weights, for explaining cached videos."""
    weights_path = Path(config.run) / f"{config.weights}.safetensors"
    if not weights_path.exists():
        raise CheckpointError(f"no {config.weights} weights in the run", weights_path)
    model = build_model(run_config, pretrained=config.pretrained).to(device).eval()
    load_weights(model, load_file(weights_path), weights_path)
    return model


def _cached_explanation(config: ExplainConfig, attrs: dict, columns: dict, row: int, selection: FeatureSelection,
                        class_names: list[str]) -> Explanation:
    """A cache video's explanation before the model looks: its names, frame numbers and frames."""
    path, label = str(columns["path"][row]), int(columns["label"][row])
    explanation = Explanation(Path(path).name, f"{config.features} row {row}: {path}", class_names,
                              tuple(attrs["backbone"]["patch_grid"]), list(selection.blocks),
                              prefix_tokens(attrs["backbone"]),
                              label=attrs["class_names"][label] if label >= 0 else None)
    if columns["status"][row] != DONE:
        explanation.error = f"not in the cache ({STATUS_NAMES[int(columns['status'][row])]})"
        return explanation
    numbers = planned_frame_numbers(int(columns["frames"][row]), str(columns["split"][row]), row,
                                    ClipSpec.from_cache(attrs))
    explanation.frame_numbers = [[view[i] for i in selection.frame_indices] for view in numbers]
    frames, explanation.frames_note = cached_frames(attrs, row, columns, config.decode_timeout)
    explanation.frames = frames[:, selection.frame_indices] if frames is not None else None
    return explanation


def cached_videos(config: ExplainConfig) -> Iterator[Explanation]:
    """Explanations of cache videos, from their cached features (no backbone)."""
    run_config = load_run(config.run)
    features = location(config.features)
    with FeatureStore(features) as store:
        attrs = store.check_version()
        check_cache_serves_run(attrs, run_config, features)
        columns = {name: store.column(name) for name in ("path", "label", "split", "frames", "status")}
    if not config.cached:
        val = np.flatnonzero((columns["split"].astype(str) == "val") & (columns["status"] == DONE))
        raise EvlCacheError("name the cache's videos to explain with --videos ROW (repeatable)"
                            + (f"; its validation videos are rows {val[0]} to {val[-1]}" if len(val) else ""))
    rows = _cache_rows(config.cached, columns["path"])
    device = resolve_device(config.device)
    model = _cached_model(config, run_config, device)
    selection = run_selection(attrs, run_config)
    with_maps = config.arrows > 0 and _arrows_possible(selection, attrs)
    reading = dataclasses.replace(selection, maps=True) if with_maps else selection
    for row in rows:
        explanation = _cached_explanation(config, attrs, columns, row, selection, run_class_names(run_config))
        if explanation.error:
            yield explanation
            continue
        dataset = CacheDataset(features, np.array([row]), reading, views="all")
        inputs = model_inputs(next(iter(CacheLoader.sequential(dataset, len(dataset)))), device)
        yield _explained(explanation, model, *_without_unread_maps(inputs, with_maps, selection.maps), device)


def _without_unread_maps(inputs: tuple, with_maps: bool, run_reads_maps: bool) -> tuple[tuple, tuple | None]:
    """(the model's inputs, the maps for the arrows): maps read only for the arrows do not go to the model."""
    maps = inputs[1:] if with_maps else None
    return (inputs if run_reads_maps or len(inputs) == 1 else (inputs[0], None, None)), maps


READING = ("<p class=note>Each picture shows one view: the frames the run samples (numbered in the video, from 0), "
           "one row per decoder layer and a last row with their mean. The colour over a frame is the share of "
           "the decoder query's attention that falls on each patch, in percent of all the frames' tokens (the "
           "heads averaged), on one scale per row; the number in a frame's corner is that frame's share of the "
           "row's attention. In the last row, white rings mark the most-attended patches of each frame, and "
           "arrows point to where the backbone's attention finds that patch in the previous frame (blue) and "
           "the next frame (green); a dot means the same place. On the right: the view's top classes. An "
           "attentive-probe run has one row: its queries' attention (averaged over the queries), over the final "
           "cached block's tokens.</p>")
READING_TEXT = ("<p class=note>A text-head run has no decoder to attend: each picture shows, for one view, each "
                "sampled frame's cosine similarity with the prompts of the view's top classes (the video's score "
                "is the similarity of the frames' mean embedding), and the top classes.</p>")


def _slug(index: int, name: str) -> str:
    """A file name for a video's page and picture folder: its position and a safe part of its name."""
    return f"{index + 1:03d}_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("_.")[:60] or "video")


def video_page(e: Explanation, pictures: list[bytes], config: ExplainConfig) -> str:
    """One video's page: where it is from, its top classes over the views, and each view's picture."""
    scores = e.mean_probabilities
    order = np.argsort(-scores)[:config.topk]
    truth = f" &middot; true class: <b>{html.escape(e.label)}</b>" if e.label is not None else ""
    body = [f"<p class=note>{html.escape(e.source)} &middot; run {html.escape(str(config.run))}{truth}</p>",
            f"<h2>Top {len(order)} classes</h2>",
            html_table(["class", "probability (views averaged)"],
                       [[e.class_names[i], f"{scores[i]:.3f}"] for i in order]),
            "<h2>How to read the pictures</h2>", READING_TEXT if e.similarities is not None else READING]
    if e.frames is None:
        body.append(f"<p class=note><b>{html.escape(e.frames_note)}</b>; the heatmaps are drawn alone.</p>")
    for view, picture in enumerate(pictures):
        numbers = e.frame_numbers[view]
        body += [f"<h2>View {view + 1} of {len(pictures)}: frames {numbers[0]} to {numbers[-1]}</h2>",
                 embedded_image(picture, f"{e.name}, view {view + 1}: what the run attends to")]
    body.append('<p><a href="index.html">All explained videos</a></p>')
    return html_page(f"{e.name}: what the run looks at", "\n".join(body))


def index_page(entries: list[tuple[Explanation, str | None]], config: ExplainConfig) -> str:
    """The index: one line per video with its prediction and a link to its page (or its error)."""
    labelled = any(e.label is not None for e, _ in entries)
    header = ["video"] + (["true class"] if labelled else []) + ["predicted class", "probability", "views"]
    lines = ["<table>", "<tr>" + "".join(f"<th>{name}</th>" for name in header) + "</tr>"]
    for e, page in entries:
        cells = [f'<a href="{html.escape(page)}">{html.escape(e.name)}</a>' if page else html.escape(e.name)]
        cells += [html.escape(e.label or "")] if labelled else []
        if e.error:
            cells.append(f"failed: {html.escape(e.error)}")
        else:
            best = int(np.argmax(e.mean_probabilities))
            cells += [html.escape(e.class_names[best]), f"{e.mean_probabilities[best]:.3f}", str(len(e.probabilities))]
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    source = f"cache {config.features}" if config.features is not None else "new videos through the run's backbone"
    note = (f"<p class=note>Run {html.escape(str(config.run))} ({config.weights} weights); {html.escape(source)}. "
            f"Probability: the predicted class's softmax averaged over the video's views.</p>")
    return html_page("What the run looks at", note + "\n" + "\n".join(lines + ["</table>"]))


def _pictures(e: Explanation, config: ExplainConfig) -> list[bytes]:
    """The picture of each view."""
    if e.similarities is not None:
        return [plot_similarities(e, view, config.topk) for view in range(len(e.probabilities))]
    return [plot_attention(e, view, config.arrows, config.topk) for view in range(len(e.probabilities))]


def _check(config: ExplainConfig) -> None:
    """Options that cannot work, refused before anything runs."""
    if config.run is None or config.out is None:
        raise EvlCacheError("--run and --out are required")
    if config.features is None and config.cached:
        raise EvlCacheError("--videos names videos of a cache: give --features CACHE (video files are arguments)")
    if config.features is not None and config.videos:
        raise EvlCacheError("give video files or --features CACHE --videos ROW, not both")
    if config.features is None and not config.videos:
        raise EvlCacheError("give video files, or --features CACHE --videos ROW for videos of a cache")
    if config.topk < 1 or config.arrows < 0 or config.decode_timeout < 0:
        raise EvlCacheError("--topk must be at least 1, --arrows and --decode-timeout at least 0")


def explain(config: ExplainConfig) -> ExplainSummary:
    """Pictures (PNG), a page per video and an index page in `config.out` for every video asked for; a
    video that fails is listed on the index with its error."""
    _check(config)
    if run_head(load_run(config.run))["kind"] == "linear-probe":
        raise EvlCacheError("a linear-probe run attends to nothing and scores no prompts: explain shows the "
                            "decoder's and the attentive probe's attention and the text heads' similarities",
                            config.run)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    entries, pages, errors = [], [], {}
    for i, e in enumerate(cached_videos(config) if config.features is not None else new_videos(config)):
        if e.error:
            log.warning("explain: %s: %s", e.source, e.error)
            errors[e.source] = e.error
            entries.append((e, None))
            continue
        slug = _slug(i, e.name)
        pictures = _pictures(e, config)
        (out / slug).mkdir(exist_ok=True)
        for view, picture in enumerate(pictures):
            (out / slug / f"view_{view + 1}.png").write_bytes(picture)
        pages.append(out / f"{slug}.html")
        pages[-1].write_text(video_page(e, pictures, config))
        entries.append((e, pages[-1].name))
        log.info("explain: %s -> %s", e.source, pages[-1])
    (out / "index.html").write_text(index_page(entries, config))
    return ExplainSummary(out / "index.html", pages, errors)
