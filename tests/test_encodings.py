"""Storage encodings: each round trip stays within its quantisation bound, per token and per map row;
caches in each encoding decode to the backbone's features, train, evaluate and predict alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import AUTOCAST_TOLERANCE
from safetensors.torch import load_file

from evl_cache.apps.predict import PredictConfig, predict
from evl_cache.cache.dataset import CacheDataset, CacheLoader, model_inputs, select_features, usable_videos
from evl_cache.cache.encodings import ENCODINGS, as_stored, decode, encode, encoding
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import FeatureStore, disk_usage
from evl_cache.cache.verify import VerifyConfig, verify
from evl_cache.cache.zarr_shards import sharded_reader
from evl_cache.decoder.evaluate import EvalConfig, evaluate
from evl_cache.decoder.metrics import average_views
from evl_cache.decoder.run import build_model, load_run, predict_views
from evl_cache.decoder.train import TrainConfig, train
from evl_cache.errors import CacheError


def _tokens(dim: int = 33) -> torch.Tensor:
    """Token-like rows: mostly small values, a few large outlier channels, one row of zeros."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dim, generator=g)
    x[..., 3] *= 40  # CLIP's residual stream has a few large channels
    x[1, 2] = 0
    return x


def _maps(dim: int = 35) -> torch.Tensor:
    """Map-like rows: softmax probabilities (non-negative, sum to one, most entries near 1/dim)."""
    g = torch.Generator().manual_seed(1)
    return (2 * torch.randn(2, 4, dim, dim, generator=g)).softmax(-1)


def _bound(name: str, values: torch.Tensor, signed: bool) -> torch.Tensor:
    """The largest error each value may have, from its row's peak (float32 decoding)."""
    peak = (values.abs() if signed else values).amax(-1, keepdim=True)
    if name == "fp8":  # 3 mantissa bits: half a unit is 1/16 of the value; subnormals below 2^-6
        scale = peak / 448
        return torch.maximum(values.abs() / 16, scale * 2.0**-10) * (1 + 1e-6)
    levels = {"int8": 127, "int4": 7}[name]
    levels = levels if signed else 2 * levels + 1
    return peak / levels / 2 * (1 + 1e-5)


@pytest.mark.parametrize("name", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("signed", [True, False], ids=["tokens", "maps"])
def test_round_trip_within_bound(name: str, signed: bool) -> None:
    enc = encoding(name)
    values = _tokens() if signed else _maps()
    codes, scale = encode(values, enc, signed)
    assert codes.numpy().dtype == enc.stored_dtype(signed)
    assert codes.shape[-1] == enc.stored_dim(values.shape[-1])  # int4: two codes per byte (odd width padded)
    assert scale.shape == values.shape[:-1] and scale.dtype == torch.float32
    decoded = decode(codes, scale, enc, signed, values.shape[-1], torch.float32)
    error = (decoded - values).abs()
    assert (error <= _bound(name, values, signed)).all(), error.max()
    assert error.max() > 0  # lossy: the test would notice an encoding that stored nothing new
    if signed:
        assert not decoded[1, 2].any()  # a zero row stays zero
    else:
        assert (decoded >= 0).all()
    # decoded to float16 by default, as a float16 cache gives values
    assert torch.equal(decode(codes, scale, enc, signed, values.shape[-1]), decoded.to(torch.float16))
    assert torch.equal(as_stored(values, enc, signed), decoded.to(torch.float16))


def test_coarser_encodings_lose_more() -> None:
    values = _tokens(64)
    errors = {name: (as_stored(values, encoding(name), True).float() - values).abs().mean().item()
              for name in ENCODINGS}
    assert errors["fp16"] < errors["int8"] < errors["int4"]
    assert errors["fp16"] < errors["fp8"] < errors["int4"]


def test_every_fp8_code_decodes_as_torch_casts_it() -> None:
    codes = torch.arange(256, dtype=torch.uint8).repeat(2, 1)
    scale = torch.tensor([1.0, 0.375])
    decoded = decode(codes, scale, encoding("fp8"), True, 256, torch.float32)
    cast = codes.view(torch.float8_e4m3fn).float() * scale[:, None]
    assert torch.equal(decoded.isnan(), cast.isnan()) and torch.equal(decoded.nan_to_num(), cast.nan_to_num())


def test_fp16_is_a_plain_cast() -> None:
    values = _tokens()
    codes, scale = encode(values, encoding("fp16"), True)
    assert scale is None and torch.equal(codes, values.to(torch.float16))


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(CacheError, match="unknown storage encoding 'int2'"):
        encoding("int2")


# --- caches in each encoding, end to end --------------------------------------------------------

TINY = dict(model="EVL-Tiny", pretrained="none", frames=4, stride=3, blocks=2, eval_views=2, workers=0,
            shard_size=4)
STORAGES = ["fp16", "int8", "fp8", "int4", "fp16+zstd", "int8+zstd"]


@pytest.fixture(scope="module")
def caches(sample_videos, tmp_path_factory) -> dict:

    root = tmp_path_factory.mktemp("storage")
    made = {}
    for storage in STORAGES:
        name, _, compress = storage.partition("+")
        made[storage] = root / f"{storage}.zarr"
        extract(ExtractConfig(out=made[storage], videos=sample_videos, storage=name, compress=compress or "none",
                              **TINY))
    return made


def _decoded_features(cache) -> dict:
    """(video, view) -> model inputs decoded from the cache through the loader, as training gets them."""

    with FeatureStore(cache) as store:
        attrs = store.attrs
        videos = usable_videos(store, ("train", "val"))
    dataset = CacheDataset(cache, videos, select_features(attrs, 2, None, 1, True), views="all")
    features = {}
    for batch in CacheLoader.sequential(dataset, 3, workers=2):
        tokens, prev, nxt = model_inputs(batch, torch.device("cpu"))
        for row, key in enumerate(zip(batch["video"].tolist(), batch["view"].tolist())):
            features[key] = [t[row] for t in tokens + prev + nxt]
    return features


@pytest.mark.parametrize("storage", STORAGES[1:])
def test_each_storage_decodes_to_the_backbone_features(caches, storage):
    """What training reads from an encoded cache is the float16 cache's features within the encoding's
    bound (the float16 cache's own rounding aside); zstd changes no value."""
    reference, decoded = _decoded_features(caches["fp16"]), _decoded_features(caches[storage])
    assert decoded.keys() == reference.keys() and len(decoded) > 10
    name, _, compress = storage.partition("+")
    for key, arrays in decoded.items():
        for i, (got, want) in enumerate(zip(arrays, reference[key])):
            signed = i < 2  # two blocks of tokens, then maps
            want = want.float()
            if name == "fp16":
                assert torch.equal(got.float(), want)
                continue
            allowed = _bound(name, want, signed) * 1.01 + want.abs() * 2.0**-10 + 1e-6
            assert ((got.float() - want).abs() <= allowed).all(), (storage, key, i)
    assert verify(VerifyConfig(caches[storage])).ok
    with FeatureStore(caches[storage]) as store:
        assert store.attrs["storage"] == {"encoding": name, "compress": compress or "none"}
        assert store.array("tokens/block_3").dtype == encoding(name).signed_dtype
    assert sharded_reader(caches[storage] / "tokens" / "block_3").compressed == (compress == "zstd")


def test_fewer_bytes_on_disk(caches):

    def feature_bytes(cache):
        return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and "videos" not in p.parts
                   and p.name != "zarr.json")

    sizes = {storage: feature_bytes(path) for storage, path in caches.items()}
    assert sizes["int8"] < 0.6 * sizes["fp16"] and sizes["fp8"] == sizes["int8"]
    assert sizes["int4"] < 0.35 * sizes["fp16"]
    assert disk_usage(caches["int4"]) < disk_usage(caches["fp16"])


@pytest.mark.parametrize("storage", ["int4", "fp8+zstd"])
def test_an_encoded_cache_trains_evaluates_and_predicts_alike(caches, sample_videos, tmp_path, storage):
    """Training and evaluation read the encoded cache; predict runs the backbone online and passes its
    output through the same encoding, so it agrees with evaluation from the cache."""


    cache = caches.get(storage)
    if cache is None:
        name, _, compress = storage.partition("+")
        cache = tmp_path / "cache.zarr"
        extract(ExtractConfig(out=cache, videos=sample_videos, storage=name, compress=compress, **TINY))
    run = tmp_path / "run"
    summary = train(TrainConfig(features=cache, out=run, layers=2, epochs=2, batch_size=4, workers=2, lr=1e-3))
    assert summary.steps > 0 and load_run(run)["cache"]["storage"]["encoding"] == storage.partition("+")[0]
    metrics = evaluate(EvalConfig(run=run, workers=0))
    model = build_model(load_run(run))
    model.load_state_dict(load_file(run / "best.safetensors"))
    with FeatureStore(cache) as store:
        attrs, videos, paths = store.attrs, usable_videos(store, ("val",)), store.column("path")
    loader = CacheLoader.sequential(CacheDataset(cache, videos, select_features(attrs, 2, None, 1, True)), 4)
    cached = average_views(*predict_views(model.eval(), loader, torch.device("cpu"), False))
    predictions = predict(PredictConfig(videos=[str(sample_videos / paths[v]) for v in cached["videos"]], run=run))
    for i, prediction in enumerate(predictions):
        np.testing.assert_allclose(prediction.logits, cached["logits"][i], **AUTOCAST_TOLERANCE)
    top1 = np.mean([np.argmax(p.probabilities) == cached["labels"][i] for i, p in enumerate(predictions)])
    assert metrics["top1"] == pytest.approx(top1)
