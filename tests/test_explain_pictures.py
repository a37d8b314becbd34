"""The pictures of `explain` say what they show: frame numbers, layers and blocks, a colour scale per row,
class names and probabilities, arrows where the matches are, and why frames are missing."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402

from evl_cache.apps.explain_pictures import Explanation, attention_figure, plot_attention, similarity_figure  # noqa: E402

GRID, FRAMES, LAYERS = (3, 4), 4, 2
CLASSES = ["archery", "bowling", "cutting a very long ribbon into many small pieces", "dancing", "eating", "fencing"]


def _explanation(frames: bool = True, matches: bool = True) -> Explanation:
    """Two views; layer attention peaked on patch 5 of each frame; each patch's previous-frame match is
    itself and its next-frame match the patch to its right (wrapping)."""
    rng = np.random.default_rng(0)
    patches = GRID[0] * GRID[1]
    attention = rng.uniform(0.5, 1, (2, LAYERS, FRAMES, 1 + patches))
    attention[..., 1 + 5] = 20
    attention /= attention.sum((2, 3), keepdims=True)
    right = (np.arange(patches) // GRID[1]) * GRID[1] + (np.arange(patches) % GRID[1] + 1) % GRID[1]
    e = Explanation("clip.mp4", "videos/clip.mp4", CLASSES, GRID, [10, 11],
                    probabilities=np.array([[0.05, 0.6, 0.2, 0.1, 0.03, 0.02], [0.1, 0.5, 0.3, 0.05, 0.03, 0.02]]),
                    frame_numbers=[[0, 5, 10, 15], [20, 25, 30, 35]], attention=attention, label="bowling")
    if matches:
        e.matches = (np.broadcast_to(np.arange(patches), (2, FRAMES - 1, patches)).copy(),
                     np.broadcast_to(right, (2, FRAMES - 1, patches)).copy())
    if frames:
        e.frames = rng.integers(0, 255, (2, FRAMES, 24, 32, 3), dtype=np.uint8)
    else:
        e.frames_note = "frames not drawn: the video is not at /data/clip.mp4"
    return e


def _texts(figure) -> list[str]:
    return [text.get_text() for text in figure.findobj(matplotlib.text.Text)]


def test_the_attention_picture_names_frames_layers_scales_and_classes():
    e = _explanation()
    figure = attention_figure(e, 1, arrows=1, topk=5)
    texts = _texts(figure)
    assert [f"frame {n}" for n in (20, 25, 30, 35)] == [t for t in texts if t.startswith("frame ")]
    assert {"layer 1\n(block 10)", "layer 2\n(block 11)", "mean of\nthe layers"} <= set(texts)
    assert sum(t == "% of attention" for t in texts) == LAYERS + 1  # a colour scale per row
    assert "clip.mp4: view 2 of 2\npredicted: bowling (50%); true class: bowling" in texts
    assert "50.0%" in texts and "cutting a very long..." in texts and "fencing" not in texts  # the top 5
    assert "top 5 classes (green: true class)" in texts and "its best match in the next frame (a dot: the same place)" \
        in texts
    shares = [t.get_text() for ax in figure.axes if ax.images for t in ax.texts if not isinstance(t, Annotation)]
    assert len(shares) == (LAYERS + 1) * FRAMES and shares[0] == f"{e.attention[1, 0, 0].sum():.0%}"
    plt.close(figure)


def test_arrows_go_from_the_most_attended_patch_to_its_matches():
    e = _explanation()
    figure = attention_figure(e, 0, arrows=1, topk=5)
    bottom = [ax for ax in figure.axes if ax.get_ylabel() == "mean of\nthe layers"][0]
    row = sorted((ax for ax in figure.axes if ax.get_position().y0 == pytest.approx(bottom.get_position().y0)
                  and ax.images), key=lambda ax: ax.get_position().x0)[:FRAMES]
    for t, ax in enumerate(row):
        arrows = [child for child in ax.get_children() if isinstance(child, Annotation)]
        # patch 5 is row 1, column 1: centre (1.5, 1.5); its next-frame match is column 2: (2.5, 1.5)
        assert [(a.xyann, a.xy) for a in arrows] == ([((1.5, 1.5), (2.5, 1.5))] if t < FRAMES - 1 else [])
        dots = [line for line in ax.lines if line.get_markersize() < 5]  # previous-frame match: the same place
        assert len(dots) == (1 if t > 0 else 0)
    plt.close(figure)
    no_arrows = attention_figure(_explanation(matches=False), 0, arrows=3, topk=5)
    assert not any(isinstance(c, Annotation) for ax in no_arrows.axes if ax.images for c in ax.get_children())
    assert "its best match in the previous frame" not in _texts(no_arrows)
    plt.close(no_arrows)


def test_without_frames_the_picture_says_why():
    e = _explanation(frames=False)
    figure = attention_figure(e, 0, arrows=2, topk=3)
    assert "Frames not drawn: the video is not at /data/clip.mp4" in _texts(figure)
    assert all(len(ax.images) <= 1 for ax in figure.axes)  # heatmaps alone
    plt.close(figure)
    assert plot_attention(e, 0, 2, 3)[:4] == b"\x89PNG"


def test_the_similarity_picture_shows_frames_against_the_top_classes():
    e = _explanation()
    e.attention, e.matches = None, None
    e.similarities = np.random.default_rng(1).uniform(0.1, 0.3, (2, FRAMES, len(CLASSES)))
    figure = similarity_figure(e, 0, topk=3)
    heatmap = [ax for ax in figure.axes if ax.get_xlabel() == "frame"][0]
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["bowling", "cutting a very long...", "dancing"]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["0", "5", "10", "15"]
    values = [t.get_text() for t in heatmap.texts]
    assert values[:FRAMES] == [f"{v:.3f}" for v in e.similarities[0, :, 1]]  # row 1: bowling, per frame
    assert "cosine similarity" in _texts(figure) and "frame 15" in _texts(figure)
    plt.close(figure)
