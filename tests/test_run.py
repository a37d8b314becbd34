"""The run folder: the model its config describes, the weights it saves and loads, the caches it reads."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from evl_cache.decoder.model import DecoderConfig, EVLModel
from evl_cache.decoder.run import (
    add_novel,
    build_model,
    check_cache_serves_run,
    harmonic_mean,
    load_run,
    load_weights,
    run_class_names,
    saved_weights,
)
from evl_cache.errors import CacheError, CheckpointError, EvlCacheError

DECODER = DecoderConfig(width=16, grid=(2, 2), frames=2, num_classes=3, layers=1, heads=2)
CACHE = {"backbone": {"weights_sha256": "a" * 64}, "class_names": ["a", "b", "c"],
         "preprocessing": {"resize": "short_side", "crop": "centre", "size": 32, "mean": [0.5] * 3, "std": [0.2] * 3},
         "sampling": {"frames": 2, "stride": 3, "mode": "dense"}}
RUN = {"decoder": dataclasses.asdict(DECODER), "cache": CACHE}


def test_a_linear_run_builds_its_decoder_and_refuses_other_classes():
    model = build_model(RUN)
    assert isinstance(model, EVLModel) and model.config == DECODER
    assert run_class_names(RUN) == ["a", "b", "c"]
    with pytest.raises(EvlCacheError, match="only text and clip-text runs"):
        build_model(RUN, class_names=["x"])


def test_saved_weights_load_back_and_must_fit(tmp_path):
    torch.manual_seed(0)
    saved = saved_weights(EVLModel(DECODER))
    model = EVLModel(DECODER)
    load_weights(model, saved, tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(model, {k: v for k, v in saved.items() if not k.startswith("proj")}, tmp_path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(EVLModel(dataclasses.replace(DECODER, num_classes=4)), saved, tmp_path)


def test_a_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a run folder"):
        load_run(tmp_path)


@pytest.mark.parametrize("change, message", [
    (("backbone", "weights_sha256", "b" * 64), "backbone weights differ"),
    (("preprocessing", "size", 64), "preprocessing differs"),
    (("sampling", "stride", 4), "sampling stride is 4"),
])
def test_a_cache_that_cannot_serve_the_run_is_refused(change, message):
    attrs = copy.deepcopy(CACHE)
    attrs[change[0]][change[1]] = change[2]
    with pytest.raises(CacheError, match=message):
        check_cache_serves_run(attrs, RUN, Path("other.zarr"))


def test_a_cache_with_other_crops_or_views_serves_the_run():
    attrs = copy.deepcopy(CACHE)
    attrs["preprocessing"]["crop"] = "three"
    check_cache_serves_run(attrs, RUN, Path("three_crops.zarr"))
    attrs["class_names"] = ["a", "b"]
    with pytest.raises(CacheError, match="class names differ"):
        check_cache_serves_run(attrs, RUN, Path("x.zarr"))


def test_base_to_novel_summary():
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2) and harmonic_mean(0, 0) == 0
    assert add_novel({"top1": 0.5}, {"top1": 0.5})["harmonic_mean"] == pytest.approx(0.5)
