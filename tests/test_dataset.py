"""The cache reader: direct shard reads equal zarr's, batches equal item-by-item reads, errors name the file."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PENDING_VIDEOS, RANDOM_LAYOUT, random_cache

import evl_cache.cache.dataset as dataset_module
from evl_cache.cache.dataset import CacheDataset, CacheLoader, EpochBatches, FeatureSelection, model_inputs
from evl_cache.cache.store import FeatureStore


@pytest.fixture(scope="module", params=["zarr", "h5", "zarr-int4"])
def cache(request, tmp_path_factory) -> Path:
    kind, _, encoding = request.param.partition("-")
    return random_cache(tmp_path_factory.mktemp("data") / f"random.{kind}", encoding or "fp16")


SELECTIONS = [FeatureSelection(blocks=(2, 3), frame_start=0, frames=5, frame_step=1, maps=True, embed=True),
              FeatureSelection(blocks=(3,), frame_start=1, frames=3, frame_step=1, maps=True),
              FeatureSelection(blocks=(3,), frame_start=0, frames=3, frame_step=2, maps=False)]


def _expected_item(store: FeatureStore, selection: FeatureSelection, video: int, view: int) -> dict:
    """An item computed by plain zarr/h5py slicing, independently of the reader: key -> arrays
    (an encoded cache's scales under "scales/<key>")."""
    frames = selection.frame_indices
    pairs = slice(selection.frame_start, selection.frame_start + selection.frames - 1)
    names = {"tokens": [(f"tokens/block_{b}", frames) for b in selection.blocks]}
    if selection.maps:
        for d in ("prev", "next"):
            names[f"maps_{d}"] = [(f"maps/block_{b}/{d}", pairs) for b in selection.blocks]
    scaled = store.attrs["storage"]["encoding"] != "fp16"
    item = {}
    for key, group in names.items():
        item[key] = [np.asarray(store.array(name)[video, view])[rows] for name, rows in group]
        if scaled:
            item[f"scales/{key}"] = [np.asarray(store.array(f"scales/{name}")[video, view])[rows]
                                     for name, rows in group]
    if selection.embed:
        item["embed"] = [np.asarray(store.array("embed")[video, view])[frames]]
    return item


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("memory", ["disk", "private", "shared"])
@pytest.mark.parametrize("selection", SELECTIONS, ids=["all", "window", "step2"])
def test_loader_batches_equal_item_reads(cache: Path, selection: FeatureSelection, workers: int,
                                         memory: str, tmp_path: Path) -> None:
    done = np.array([v for v in range(RANDOM_LAYOUT["num_videos"]) if v not in PENDING_VIDEOS])
    dataset = CacheDataset(cache, done, selection, views="random", seed=3)
    if memory == "private":
        dataset.hold_in_memory()
    elif memory == "shared":  # one process reads into a shared file; another (here: a second dataset) maps it
        shared = tmp_path / CacheDataset(cache, done, selection).shared_memory_name()
        CacheDataset(cache, done, selection, views="random", seed=3).hold_in_memory(shared, read=True)
        dataset.hold_in_memory(shared, read=False)
        assert shared.stat().st_size == dataset.memory_bytes() and not list(tmp_path.glob("*.partial-*"))
    sampler = EpochBatches(len(dataset), 3, seed=1)
    loader = CacheLoader(dataset, sampler, workers=workers, prefetch=2)
    with FeatureStore(cache) as store:
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            seen = []
            for batch, keys in zip(loader, sampler):
                samples = dataset.samples(keys)
                assert batch["video"].tolist() == [v for v, _ in samples]
                assert batch["view"].tolist() == [v for _, v in samples]
                for row, (video, view) in enumerate(samples):
                    for key, values in _expected_item(store, selection, video, view).items():
                        got = batch["scales"][key[7:]] if key.startswith("scales/") else batch[key]
                        got = got if isinstance(got, list) else [got]
                        for tensor, want in zip(got, values, strict=True):
                            np.testing.assert_array_equal(tensor[row].numpy(), want, err_msg=key)
                    assert batch["label"][row] == video % 3
                seen += [v for v, _ in samples]
            assert sorted(seen) == sorted(done.tolist())
    groups = [batch, batch.get("scales", {})]
    features = [t for g in groups for key in ("tokens", "maps_prev", "maps_next") for t in g.get(key, [])] + (
        [batch["embed"]] if "embed" in batch else [])
    assert dataset.bytes_per_item() == sum(t[0].nbytes for t in features)


def test_random_views_are_drawn_per_epoch_and_reproducible(cache: Path) -> None:
    selection = SELECTIONS[2]
    dataset = CacheDataset(cache, np.arange(1, 5), selection, views="random", seed=7)
    draws = {epoch: [view for _, view in dataset.samples([(i, epoch) for i in range(4)])] for epoch in range(6)}
    assert len({tuple(d) for d in draws.values()}) > 1  # views change across epochs
    again = CacheDataset(cache, np.arange(1, 5), selection, views="random", seed=7)
    assert draws[3] == [view for _, view in again.samples([(i, 3) for i in range(4)])]
    item = dataset[(2, 3)]  # one item, no batch axis
    assert item["tokens"][0].shape[:2] == (3, RANDOM_LAYOUT["tokens"]) and item["view"] == draws[3][2]


def test_pinned_batches_live_in_a_fixed_ring_of_buffers(cache: Path, monkeypatch) -> None:
    """With pin_memory (here ordinary memory standing in for pinned), an epoch of any length uses
    prefetch + 2 buffers, each one allocation. A buffer is filled again only once the copies from its
    last batch have run (the event `model_inputs` recorded, or the one its release recorded), and every
    batch keeps its own values while the consumer holds it, though the readers run ahead meanwhile."""
    allocated, events = [], []

    def host_bytes(nbytes, pinned):
        assert pinned
        allocated.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    class Event:
        def __init__(self, device):
            self.device, self.waited = device, False
            events.append(self)

        def synchronize(self):
            self.waited = True

    monkeypatch.setattr(dataset_module, "_host_bytes", host_bytes)
    monkeypatch.setattr(dataset_module, "_copy_event", lambda device=None: Event(device))
    monkeypatch.setattr(dataset_module, "_moved_inputs", lambda batch, device: ())  # no GPU to copy to
    done = np.array([v for v in range(RANDOM_LAYOUT["num_videos"]) if v not in PENDING_VIDEOS])
    dataset = CacheDataset(cache, done, SELECTIONS[0], views="all")
    loader = CacheLoader.sequential(dataset, 2, workers=2, pin_memory=True)
    assert loader.prefetch == 2
    for number, batch in enumerate(loader):
        if number % 2:  # half the batches go through model_inputs, which records when its copies are queued
            model_inputs(batch, torch.device("cuda", 0))
        time.sleep(0.02)  # the readers fill the next buffers meanwhile
        for row, item in enumerate(range(2 * number, min(2 * number + 2, len(dataset)))):
            expected = dataset[item]
            for key in ("tokens", "maps_prev", "maps_next"):
                for got, want in zip(batch[key], expected[key], strict=True):
                    assert got[row].equal(want), (number, key)
    batches = number + 1
    assert batches == len(loader) > 4 and len(allocated) == 4
    assert len(events) == batches and sum(event.waited for event in events) == batches - 4
    assert [event.device for event in events[1::2]] == [torch.device("cuda", 0)] * (batches // 2)
    exact = 2 * dataset.bytes_per_item()
    assert exact <= allocated[0] < exact + 64 * len(dataset.item_shapes)  # one allocation, 64-byte aligned views
