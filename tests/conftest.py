"""Shared fixtures: generated videos and tiny open_clip models, made once per test session.

The device is a parameter of the suite: `EVL_TEST_DEVICE=cuda python -m pytest` runs it on a GPU, where
every command's default device ('auto') finds one. The default, `cpu`, hides any GPU from the tests
and the processes they start, so the suite runs on the CPU wherever it runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
DEVICE = os.environ.get("EVL_TEST_DEVICE", "cpu")
ON_GPU = DEVICE == "cuda"
if not ON_GPU:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for one
else:  # read when cuBLAS starts: the exactness tests compare runs made before and after train() would set it
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Where the code autocasts (extraction, training and prediction run in float16 on CUDA), what it computes
# on the test device is held to float32 references within these bounds; maps are computed in float32.
AUTOCAST_TOLERANCE = dict(rtol=1e-2, atol=1e-2) if ON_GPU else dict(rtol=2e-3, atol=2e-3)
MAP_TOLERANCE = dict(rtol=1e-2, atol=1e-3) if ON_GPU else dict(rtol=2e-3, atol=1e-4)

import torch  # noqa: E402

from evl_cache import ExtractConfig, extract  # noqa: E402
from evl_cache.cache import encodings  # noqa: E402
from evl_cache.cache.calibration import calibration_record  # noqa: E402
from evl_cache.cache.store import DONE, PENDING, CacheLayout, FeatureStore  # noqa: E402
from evl_cache.video.synthetic import (  # noqa: E402
    make_sample_dataset,
    moving_shape_frames,
    truncate_file,
    write_audio_only,
    write_empty_file,
    write_text_file,
    write_video,
)


def pytest_configure(config) -> None:
    if DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"EVL_TEST_DEVICE={DEVICE}: cpu or cuda")
    import torch
    if ON_GPU and not torch.cuda.is_available():
        raise pytest.UsageError("EVL_TEST_DEVICE=cuda, but CUDA is not available here")


@pytest.fixture(scope="session")
def device():
    """The device the suite runs on (EVL_TEST_DEVICE)."""
    import torch
    return torch.device(DEVICE)


TINY = "EVL-Tiny"
# The tiny caches' extraction: the shipped EVL-Tiny config with random weights, 4 frames, 2 blocks.
TINY_EXTRACT = dict(model=TINY, pretrained="none", frames=4, stride=3, eval_views=2, blocks=2, workers=0)


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> Path:
    """The demo's sample dataset, small: root/{train,val}/<class>/*.mp4, 4 classes."""
    root = tmp_path_factory.mktemp("sample")
    return make_sample_dataset(root, videos_per_class={"train": 3, "val": 2}, num_frames=24, size=(40, 52))


@pytest.fixture(scope="session")
def messy_videos(tmp_path_factory) -> Path:
    """What real datasets contain: several codecs, odd and portrait sizes, VFR, audio, short clips,
    and broken files, in root/<class>/ folders (no split level)."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)

    def frames(n: int, h: int, w: int, direction: str = "right") -> np.ndarray:
        return moving_shape_frames(n, h, w, "square", (230, 200, 30), direction, rng)

    good = root / "good"
    good.mkdir()
    write_video(good / "h264.mp4", frames(30, 48, 64))
    write_video(good / "mpeg4.avi", frames(30, 40, 56), codec="mpeg4")
    write_video(good / "vp8.webm", frames(30, 48, 64), codec="libvpx")
    write_video(good / "portrait.mp4", frames(30, 96, 48))
    write_video(good / "odd size.mkv", frames(30, 61, 97), codec="mpeg4")
    write_video(good / "with_audio.mp4", frames(30, 48, 64), audio=True)
    times = np.cumsum(rng.uniform(0.02, 0.08, size=30))
    write_video(good / "vfr.webm", frames(30, 48, 64), codec="libvpx", frame_times=list(times - times[0]))
    write_video(good / "short.mp4", frames(3, 48, 64))
    write_video(good / "no_frame_count.ts", frames(30, 48, 64))  # MPEG-TS headers carry no frame count
    bad = root / "bad"
    bad.mkdir()
    write_empty_file(bad / "empty.mp4")
    write_text_file(bad / "text.mp4")
    write_audio_only(bad / "audio_only.mp4")
    write_video(bad / "truncated.mp4", frames(30, 48, 64))
    truncate_file(bad / "truncated.mp4", 0.3)
    (bad / "dangling.mp4").symlink_to(root / "does-not-exist.mp4")
    return root


@pytest.fixture(scope="session")
def messy_cache(messy_videos, tmp_path_factory):
    """The messy videos extracted in shards of 3: (the cache, the extraction's summary)."""
    out = tmp_path_factory.mktemp("messy_cache") / "feats.zarr"
    summary = extract(ExtractConfig(out=out, videos=messy_videos, shard_size=3, **TINY_EXTRACT))
    return out, summary


@pytest.fixture(scope="session")
def tiny_cache(sample_videos, tmp_path_factory) -> Path:
    """The sample videos extracted with TINY_EXTRACT (Zarr): 12 train and 8 val videos, 4 classes."""
    out = tmp_path_factory.mktemp("tiny") / "feats.zarr"
    extract(ExtractConfig(out=out, videos=sample_videos, **TINY_EXTRACT))
    return out


@pytest.fixture(scope="session")
def learnable_cache(tmp_path_factory) -> Path:
    """Enough videos to learn from: 4 classes (2 told apart by motion only), 6 train and 3 val videos
    per class, 3 cached blocks."""
    root = tmp_path_factory.mktemp("learnable")
    videos = make_sample_dataset(root / "videos", videos_per_class={"train": 6, "val": 3}, num_frames=24,
                                 size=(40, 52))
    out = root / "feats.zarr"
    extract(ExtractConfig(out=out, videos=videos, **{**TINY_EXTRACT, "blocks": 3}))
    return out


RANDOM_LAYOUT = dict(num_videos=10, views=2, frames=5, tokens=7, width=8, grid=(2, 3), embed_dim=6, blocks=(2, 3),
              shard_size=4)
PENDING_VIDEOS = (5, 8, 9)  # never written: empty chunks in a shard (5), a shard never written (8, 9)


def random_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Random stored values of `dtype`: floats, or any code of an integer type."""
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def assert_trained_alike(ours: dict, reference: dict, lr: float, steps: int, share: float = 0.005) -> None:
    """Weights trained from the same start on the same global batches, with the float sums in another order
    (several processes against one): equal within float rounding, but for the few values whose gradient is
    float noise about zero, which AdamW turns into steps of up to about lr each. At most `share` of all the
    values may differ, each by at most 2 * lr * steps; a training that differs in earnest moves most values."""
    assert ours.keys() == reference.keys()
    apart = total = 0
    for key, value in reference.items():
        close = torch.isclose(ours[key], value, rtol=1e-4, atol=1e-6)
        apart, total = apart + int((~close).sum()), total + close.numel()
        assert float((ours[key] - value).abs().max()) <= 2 * lr * steps, key
    assert apart <= share * total, f"{apart} of {total} values differ"


def random_cache(path: Path, encoding: str = "fp16") -> Path:
    """A cache of random stored values with the store's own layout; PENDING_VIDEOS without data, and
    video 0 with one view of two (its second view's chunks are never written)."""
    layout = CacheLayout(**RANDOM_LAYOUT, encoding=encoding)
    enc = encodings.encoding(encoding)
    generator = torch.Generator().manual_seed(0)
    calibration = calibration_record({b: torch.randn(3, layout.width, generator=generator) for b in layout.blocks}, 1)
    attrs = {"blocks": list(layout.blocks), "sampling": {"frames": layout.frames},
             "backbone": {"width": layout.width, "patch_grid": list(layout.grid)},
             "storage": {**enc.record(), "compress": "none",
                         **({"calibration": calibration} if enc.calibrated else {})}}
    n = layout.num_videos
    columns = {"path": np.array([f"v{i}.mp4" for i in range(n)], dtype=object),
               "label": (np.arange(n) % 3).astype(np.int32), "split": np.array(["train"] * n, dtype=object)}
    store = FeatureStore.create(path, layout, attrs, columns)
    rng = np.random.default_rng(0)
    views = np.full(n, layout.views, np.int16)
    views[0] = 1
    status = np.full(n, DONE, np.uint8)
    status[list(PENDING_VIDEOS)] = PENDING
    for name, (shape, _, dtype) in layout.feature_arrays().items():
        values = random_values(rng, shape, dtype)
        values[list(PENDING_VIDEOS)] = 0
        values[0, 1:] = 0
        if store.kind == "zarr":
            for start in range(0, n, layout.shard_size):  # whole shards, as extraction writes them
                store.write_block(name, start, values[start:start + layout.shard_size])
        else:
            for video in np.flatnonzero(status == DONE):
                store.array(name)[video, : views[video]] = values[video, : views[video]]
    store.write_rows("views", 0, views)
    store.write_rows("status", 0, status)
    store.close()
    return path
