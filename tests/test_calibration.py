"""A cache's calibration: fitted once from the first videos, stored, reused by resumes; the errors it
measures, and the one-line warning when the chosen encoding loses more than its bound."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

import evl_cache.cache.calibration as calibration_module
import evl_cache.cache.extract as extract_module
from evl_cache.cache.calibration import block_channels, calibration_record, fit_channels, token_errors, warning
from evl_cache.cache.dataset import CacheDataset, CacheLoader, model_inputs, select_features, usable_videos
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import DONE, PENDING, FeatureStore

OUTLIER_TINY = dict(model="EVL-Tiny", pretrained="none+outliers", frames=4, stride=3, blocks=2, eval_views=1,
                    workers=0, shard_size=4, calibration_videos=4)


def test_fit_channels_centres_and_scales_each_channel_in_float16():
    tokens = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 2, 3, 4, 5, 0.0])
    tokens[:, 1] += 100
    centre, scale = fit_channels(tokens)
    assert torch.equal(centre, centre.half().float()) and torch.equal(scale, scale.half().float())
    assert centre[1] == pytest.approx(100, abs=0.3) and scale[1] == pytest.approx(2, rel=0.1)
    assert scale[5] == 1  # a constant channel: scale 1, not 0


def test_the_record_gives_back_the_fitted_values_exactly():
    tokens = {3: torch.randn(50, 8) * 7 + 2, 5: torch.randn(50, 8)}
    record = calibration_record(tokens, videos=2)
    assert record["videos"] == 2 and sorted(record["blocks"]) == ["3", "5"]
    for block, values in tokens.items():
        for got, want in zip(block_channels({"calibration": record}, block), fit_channels(values)):
            assert torch.equal(got, want)
    assert block_channels({"calibration": record}, 4) is None and block_channels({}, 3) is None


def test_token_errors_keep_the_outlier_channels_apart():
    reference = torch.randn(400, 40, generator=torch.Generator().manual_seed(1))
    reference[:, 7] += 500
    decoded = reference.clone()
    decoded[:, :7] *= 1.1  # ordinary channels 10 % off
    decoded[:, 7] += 5  # 1 % of the outlier channel
    errors = token_errors(decoded, reference)
    assert errors["median"] == pytest.approx(0.0, abs=1e-9) and errors["p99"] == pytest.approx(0.1, rel=1e-3)
    assert errors["outliers"] == pytest.approx(0.01, rel=0.01)


def _errors(tokens: float, maps: float) -> dict:
    return {"tokens_median": tokens, "tokens_p99": tokens, "maps_l1": maps, "maps_l1_p99": maps}


def test_the_warning_names_the_fewest_bytes_encoding_that_keeps_the_bound():
    measured = {"fp16": _errors(3e-4, 1e-4), "int8": _errors(0.01, 0.004), "fp8": _errors(0.03, 0.02),
                "int4": _errors(0.3, 0.03)}
    assert warning("int8", measured, 8) is None
    line = warning("int4", measured, 8)
    assert "tokens' median per-channel error 0.3 (bound 0.15)" in line and line.endswith("(--storage int8)")
    assert "\n" not in line and "8 calibration videos" in line
    measured["int8"] = measured["fp8"] = _errors(0.5, 0.5)
    assert warning("int4", measured, 8).endswith("(--storage fp16)")


def test_extraction_warns_when_its_encoding_is_above_its_bound(sample_videos, tmp_path, monkeypatch, caplog):
    """On the outlier tower int8 and int4 keep their bounds (no warning); with int4's bound made tighter
    than int4 can keep, the extraction says so once and names int8."""
    with caplog.at_level(logging.WARNING, logger="evl_cache.cache.extract"):
        for storage in ("int8", "int4"):
            extract(ExtractConfig(out=tmp_path / f"{storage}.zarr", videos=sample_videos, storage=storage,
                                  **OUTLIER_TINY))
        assert not [r for r in caplog.records if "loses more" in r.message]
        monkeypatch.setitem(calibration_module.BOUNDS, "int4", (0.01, 0.05))
        extract(ExtractConfig(out=tmp_path / "tight.zarr", videos=sample_videos, storage="int4", **OUTLIER_TINY))
    lines = [r.message for r in caplog.records if "loses more" in r.message]
    assert len(lines) == 1 and "--storage int4" in lines[0] and lines[0].endswith("(--storage int8)")
    with FeatureStore(tmp_path / "int8.zarr") as store:
        calibration = store.attrs["storage"]["calibration"]
    assert calibration["videos"] == 4 and sorted(calibration["blocks"]) == ["2", "3"]
    assert calibration["errors"]["tokens_median"] <= 0.02


def test_a_resumed_cache_keeps_its_calibration(sample_videos, tmp_path, monkeypatch):
    """A resume encodes with the calibration in the cache, never a new one: here the stored one is
    altered before resuming, and the redone videos follow it."""
    first = tmp_path / "first.zarr"
    extract(ExtractConfig(out=first, videos=sample_videos, storage="int8", **OUTLIER_TINY))
    resumed = tmp_path / "resumed.zarr"
    shutil.copytree(first, resumed)
    with FeatureStore(resumed, mode="r+") as store:
        attrs = store.attrs
        channels = attrs["storage"]["calibration"]["blocks"]["3"]
        channels["scale"] = [2 * v for v in channels["scale"]]
        store.set_attrs(attrs)
        status = store.column("status")
        status[4:8] = PENDING  # the second shard, as a killed run leaves it
        store.write_rows("status", 0, status)
    monkeypatch.setattr(extract_module, "calibrate", lambda *args: pytest.fail("a resume calibrated again"))
    summary = extract(ExtractConfig(out=resumed, videos=sample_videos, storage="int8", **OUTLIER_TINY))
    assert summary.done == 4 and summary.skipped == 16
    with FeatureStore(first) as a, FeatureStore(resumed) as b:
        assert b.attrs["storage"]["calibration"]["blocks"]["3"]["scale"] == channels["scale"]
        assert (b.column("status") == DONE).all()
        np.testing.assert_array_equal(a.array("tokens/block_2")[:], b.array("tokens/block_2")[:])
        # each channel divided by twice its scale: the same codes, each token's scale halved
        old, new = (np.asarray(store.array("scales/tokens/block_3")) for store in (a, b))
        np.testing.assert_allclose(new[4:8], old[4:8] / 2, rtol=1e-6)
        np.testing.assert_array_equal(new[:4], old[:4])  # the videos kept as they were


@pytest.mark.parametrize("model, prefix", [("EVL-Tiny-SL2", 0), ("EVL-Tiny-Reg", 5)])
def test_a_tower_with_other_prefix_tokens_is_calibrated_and_decodes(sample_videos, tmp_path, model, prefix):
    """int4 on a SigLIP-like tower (no class token) and a register ViT (5 prefix tokens): every token of a
    frame is calibrated and coded, the errors measured are within int4's bounds, and training reads
    prefix + 16 tokens per frame back."""
    out = tmp_path / "int4.zarr"
    extract(ExtractConfig(out=out, videos=sample_videos, storage="int4", **{**OUTLIER_TINY, "model": model,
                                                                           "pretrained": "none"}))
    with FeatureStore(out) as store:
        attrs = store.check_version()
        videos = usable_videos(store, ("val",))
    calibration = attrs["storage"]["calibration"]
    assert [len(calibration["blocks"][b]["scale"]) for b in ("2", "3")] == [64, 64]
    assert calibration_module.within("int4", calibration["errors"])
    dataset = CacheDataset(out, videos, select_features(attrs, 2, None, 1, True), views="first")
    tokens = model_inputs(next(iter(CacheLoader.sequential(dataset, 4))), torch.device("cpu"))[0]
    assert [tuple(t.shape[2:]) for t in tokens] == [(prefix + 16, 64)] * 2
    assert all(torch.isfinite(t).all() for t in tokens)
