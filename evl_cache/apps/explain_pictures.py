"""The pictures of `explain`, one per video and view, made to be read without the code.

`Explanation` holds what they show. The attention picture has a row per decoder layer and a row for
their mean, a column per sampled frame (titled with its frame number), a colour scale per row in
percent of the query's attention, each frame's share of the row's attention in its corner, arrows for
the best matches in the adjacent frames, a legend, and the top classes. The text-head picture has the
frames above a frames x classes heatmap of cosine similarities, with its colour scale, and the top
classes.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np

from .pages import png_bytes


@dataclass
class Explanation:
    """What the pictures of one video show, per view (V views of T frames, K classes)."""
    name: str  # what the pages call the video
    source: str  # its file, or its cache and row
    class_names: list[str]
    grid: tuple[int, int]  # (h, w) patches
    blocks: list[int]  # the backbone block each decoder layer reads
    prefix_tokens: int = 1  # the tower's tokens before the patches in each frame (class, registers)
    probabilities: np.ndarray | None = None  # [V, K]
    frame_numbers: list[list[int]] | None = None  # [V][T] in the video, counted from 0
    attention: np.ndarray | None = None  # [V, N, T, L] each decoder layer's query attention, heads averaged
    matches: tuple[np.ndarray, np.ndarray] | None = None  # best match of each patch in frame t-1 and t+1: [V, T-1, P]
    similarities: np.ndarray | None = None  # [V, T, K] text heads: cosine of each frame and class prompt
    frames: np.ndarray | None = None  # uint8 [V, T, S, S, 3] the pixels the backbone saw
    frames_note: str = ""  # why the frames are not drawn
    label: str | None = None  # the true class, when the cache knows it
    error: str = ""

    @property
    def mean_probabilities(self) -> np.ndarray:
        """The video's class scores: the softmax averaged over its views, as evaluation does."""
        return self.probabilities.mean(0)


PREVIOUS, NEXT = "#26c6ff", "#7dff3a"  # arrow colours: match in the previous frame, in the next frame


def _heat_colours(over_frame: bool):
    """Inferno for the heatmaps; over a frame its low end fades out, so the frame shows where the query
    hardly looks and the colour covers it where it looks most."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    colours = colormaps["inferno"](np.linspace(0, 1, 256))
    if over_frame:
        colours[:, 3] = np.linspace(0.05, 0.85, 256)
    return ListedColormap(colours)


def _outlined(width: float = 3.0) -> list:
    """A dark outline, so a mark stays visible on bright and dark patches alike."""
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=width, foreground="black")]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _view_title(e: Explanation, view: int) -> str:
    """The video, the view, the prediction and the truth, in two lines."""
    probabilities = e.probabilities[view]
    best = int(np.argmax(probabilities))
    views = len(e.probabilities)
    first = f"{e.name}: view {view + 1} of {views}" if views > 1 else e.name
    truth = f"; true class: {e.label}" if e.label is not None else ""
    return f"{first}\npredicted: {e.class_names[best]} ({probabilities[best]:.0%}){truth}"


def _top_classes(ax, e: Explanation, view: int, topk: int) -> None:
    """Horizontal bars of this view's top classes and their probabilities; the true class in green."""
    probabilities = e.probabilities[view]
    order = np.argsort(-probabilities)[:topk]
    names = [textwrap.shorten(e.class_names[i], 28, placeholder="...") for i in order]
    colours = ["#2ca02c" if e.class_names[i] == e.label else "#7f7f7f" for i in order]
    bars = ax.barh(range(len(order)), probabilities[order], height=0.45, color=colours)
    ax.bar_label(bars, [f"{probabilities[i]:.1%}" for i in order], padding=3, fontsize=9)
    for position, name in enumerate(names):  # names above their bars: any length fits
        ax.text(0, position - 0.3, name, fontsize=9, va="bottom")
    ax.set_yticks([])
    ax.set_ylim(len(order) - 0.5, -0.9)
    ax.set_xlim(0, 1.3)
    ax.set_xticks([0, 0.5, 1], ["0", "50%", "100%"])
    ax.set_title(f"top {len(order)} classes" + (" (green: true class)" if e.label is not None else ""), fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _patch_centre(patch: int, grid: tuple[int, int]) -> tuple[float, float]:
    """(x, y) of a patch's centre in patch units (row-major patch order)."""
    return patch % grid[1] + 0.5, patch // grid[1] + 0.5


def _draw_matches(ax, e: Explanation, view: int, frame: int, heat: np.ndarray, count: int) -> None:
    """For the `count` most-attended patches of the frame: a white ring, and an arrow to its best match
    in the previous and the next frame (a coloured dot when the match is the same patch)."""
    prev, nxt = e.matches
    frames = len(e.frame_numbers[view])
    for patch in np.argsort(-heat.ravel())[:count]:
        x, y = _patch_centre(int(patch), e.grid)
        ax.plot(x, y, "o", markersize=7, markerfacecolor="none", markeredgecolor="white", markeredgewidth=1.5,
                path_effects=_outlined())
        for colour, maps, row in ((PREVIOUS, prev, frame - 1), (NEXT, nxt, frame)):
            if not 0 <= row < frames - 1:
                continue
            tx, ty = _patch_centre(int(maps[view, row, patch]), e.grid)
            if (tx, ty) == (x, y):
                ax.plot(x, y, "o", markersize=3.5, color=colour, path_effects=_outlined(2))
            else:
                arrow = ax.annotate("", xy=(tx, ty), xytext=(x, y),
                                    arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.8, shrinkA=3, shrinkB=0))
                arrow.arrow_patch.set_path_effects(_outlined(3.5))


def _draw_cell(ax, frame: np.ndarray | None, heat: np.ndarray, vmax: float, grid: tuple[int, int]):
    """One frame with a heatmap over its patches (or the heatmap alone); returns the heatmap's image."""
    extent = (0, grid[1], grid[0], 0)
    if frame is not None:
        ax.imshow(frame, extent=extent)
    image = ax.imshow(heat, cmap=_heat_colours(frame is not None), vmin=0, vmax=vmax, extent=extent,
                      interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def _attention_rows(e: Explanation, view: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(row labels, heatmaps in % [N+1, T, h, w], each frame's share of the row's attention [N+1, T]):
    a row per decoder layer, then their mean."""
    attention = e.attention[view]  # [N, T, L]
    layers, frames = attention.shape[:2]
    patches = 100 * attention[:, :, e.prefix_tokens:].reshape(layers, frames, *e.grid)
    heat = np.concatenate([patches, patches.mean(0, keepdims=True)])
    shares = attention.sum(-1)
    shares = np.concatenate([shares, shares.mean(0, keepdims=True)])
    labels = [f"layer {i + 1}\n(block {block})" for i, block in enumerate(e.blocks)] + ["mean of\nthe layers"]
    return labels, heat, shares


def _notes(fig, top: float, lines: list[str], missing_frames: str) -> None:
    """How to read the picture, from `top` (a figure fraction) down; why the frames are missing, in bold."""
    text = "\n".join(textwrap.wrap(" ".join(lines), 175))
    fig.text(0.01, top, text, fontsize=8.5, va="top")
    if missing_frames:
        fig.text(0.01, top - 0.16 * (text.count("\n") + 1) / fig.get_figheight(),
                 missing_frames[:1].upper() + missing_frames[1:], fontsize=8.5, va="top", weight="bold")


def _arrow_legend(fig) -> None:
    """What the rings and the two arrow colours mean, along the bottom edge."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="black",
                      label="most-attended patches (bottom row)"),
               Line2D([], [], color=PREVIOUS, lw=2, marker=">", label="its best match in the previous frame"),
               Line2D([], [], color=NEXT, lw=2, marker=">", label="its best match in the next frame (a dot: the "
                                                                  "same place)")]
    fig.legend(handles=handles, loc="lower left", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.01, 0.0))


ATTENTION_NOTE = ["Colour: the share of the decoder query's attention that falls on each patch, in % of all the",
                  "frames' tokens (heads averaged), one scale per row. Corner: the frame's share of the row's",
                  "attention. Frame numbers count the video's decoded frames from 0."]


def plot_attention(e: Explanation, view: int, arrows: int, topk: int) -> bytes:
    """The attention picture of one view, as PNG bytes."""
    return png_bytes(attention_figure(e, view, arrows, topk))


def attention_figure(e: Explanation, view: int, arrows: int, topk: int):
    """The attention picture of one view (a matplotlib figure)."""
    plt = _pyplot()
    labels, heat, shares = _attention_rows(e, view)
    rows, frames = heat.shape[:2]
    height = 1.6 * rows + 2.15  # inches: 1 for the title, 1.15 for the notes and the legend
    fig = plt.figure(figsize=(1.55 * frames + 5.2, height))
    grid = fig.add_gridspec(rows, frames + 3, width_ratios=[1] * frames + [0.07, 0.45, 2.6], left=0.06, right=0.98,
                            top=1 - 1 / height, bottom=1.15 / height, wspace=0.05, hspace=0.12)
    for r in range(rows):
        vmax = max(float(heat[r].max()), 1e-6)
        for t in range(frames):
            ax = fig.add_subplot(grid[r, t])
            frame = e.frames[view, t] if e.frames is not None else None
            image = _draw_cell(ax, frame, heat[r, t], vmax, e.grid)
            ax.text(0.03, 0.04, f"{shares[r, t]:.0%}", transform=ax.transAxes, fontsize=8,
                    bbox=dict(facecolor="white", alpha=0.8, pad=1.5, linewidth=0))
            if r == 0:
                ax.set_title(f"frame {e.frame_numbers[view][t]}", fontsize=9)
            if t == 0:
                ax.set_ylabel(labels[r], fontsize=9)
            if r == rows - 1 and e.matches is not None and arrows > 0:
                _draw_matches(ax, e, view, t, heat[r, t], arrows)
        bar = fig.colorbar(image, cax=fig.add_subplot(grid[r, frames]))
        bar.ax.tick_params(labelsize=7)
        bar.set_label("% of attention", fontsize=7)
    _top_classes(fig.add_subplot(grid[: min(rows, 3), frames + 2]), e, view, topk)
    fig.suptitle(_view_title(e, view), x=0.06, ha="left", fontsize=11)
    _notes(fig, 0.95 / height, ATTENTION_NOTE, "" if e.frames is not None else e.frames_note or "frames not drawn")
    if e.matches is not None and arrows > 0:
        _arrow_legend(fig)
    return fig


def plot_similarities(e: Explanation, view: int, topk: int) -> bytes:
    """The text-head picture of one view, as PNG bytes."""
    return png_bytes(similarity_figure(e, view, topk))


def similarity_figure(e: Explanation, view: int, topk: int):
    """The text-head picture of one view: frames, then each frame's cosine with the top classes' prompts."""
    plt = _pyplot()
    similarities = e.similarities[view]  # [T, K]
    frames = similarities.shape[0]
    order = np.argsort(-e.probabilities[view])[:topk]
    top = 1 if e.frames is not None else 0
    width, height = 1.3 * frames + 6.5, 2.3 + 0.45 * len(order) + 1.5 * top  # inches: 1 title, 1.3 notes
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(top + 1, frames + 3, width_ratios=[1] * frames + [0.1, 0.5, 2.6],
                            height_ratios=([1.3] if top else []) + [0.45 * len(order)], left=2 / width, right=0.98,
                            top=1 - 1 / height, bottom=1.3 / height, wspace=0.08, hspace=0.15)
    for t in range(frames if top else 0):
        ax = fig.add_subplot(grid[0, t])
        ax.imshow(e.frames[view, t])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"frame {e.frame_numbers[view][t]}", fontsize=9)
    ax = fig.add_subplot(grid[top, :frames])
    values = similarities[:, order].T
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    for (k, t), value in np.ndenumerate(values):
        ax.text(t, k, f"{value:.3f}", ha="center", va="center", fontsize=7,
                color="black" if value > values.min() + 0.6 * np.ptp(values) else "white")
    ax.set_yticks(range(len(order)), [textwrap.shorten(e.class_names[i], 28, placeholder="...") for i in order])
    ax.set_xticks(range(frames), [str(n) for n in e.frame_numbers[view]], fontsize=8)
    ax.set_xlabel("frame")
    fig.colorbar(image, cax=fig.add_subplot(grid[top, frames]), label="cosine similarity")
    _top_classes(fig.add_subplot(grid[:, frames + 2]), e, view, topk)
    _notes(fig, 0.7 / height, ["Colour and numbers: the cosine similarity of each frame's CLIP embedding and each",
                                "class's text prompt; the video's score compares the frames' mean embedding."],
           "" if e.frames is not None else e.frames_note or "frames not drawn")
    fig.suptitle(_view_title(e, view), x=0.01, ha="left", fontsize=11)
    return fig
