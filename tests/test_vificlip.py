"""ViFi-CLIP checkpoints: conversion to open_clip weights, zero-shot with learned prompts, export in ViFi-CLIP's
layout, refusals. The reference is ViFi-CLIP's forward written out from a checkpoint's own tensors
(`vifi_reference`).
"""
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from vifi_reference import (
    IMAGENET,
    TINY,
    _layer_norm,
    _prompted,
    bridge_and_prompt,
    random_clip_state,
    vifi_image_features,
    vifi_prompt_embeddings,
    vifi_text_features,
    write_checkpoint,
)

from evl_cache.apps.zeroshot import ZeroShotConfig, zeroshot, zeroshot_scores
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.errors import BackboneError, CheckpointError, EvlCacheError
from evl_cache.towers.backbone import FrozenBackbone, adjacent_maps, load_clip
from evl_cache.towers.text import ClassPrompts, TextTower
from evl_cache.towers.vificlip import (
    VifiExportConfig,
    VifiImportConfig,
    export_vificlip,
    import_vificlip,
    learned_prompt,
    prompt_class_names,
)
from evl_cache.video.clips import ClipSpec, read_video_clips

# --- conversion -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """Base CLIP weights (another random model), as a local open_clip weights file."""
    path = tmp_path_factory.mktemp("base") / "base_clip.pt"
    torch.save(random_clip_state(seed=2), path)
    return path


def test_conversion_loads_into_open_clip_and_computes_what_vifi_clip_computes(tmp_path, base_file):
    source = random_clip_state(seed=1)
    checkpoint = write_checkpoint(tmp_path / "vifi.pth", source, ctx_init="a video_of a")
    result = import_vificlip(VifiImportConfig(checkpoint=tmp_path / "vifi.pth", out=tmp_path / "vifi_tiny.pt",
                                              base=str(base_file), model=TINY))
    assert result.prompt_template == "a video of a {}." and result.context_tokens == 0  # from the saved config
    converted, spec = load_clip(TINY, str(tmp_path / "vifi_tiny.pt"))
    assert spec.quick_gelu
    state = converted.state_dict()
    base = torch.load(base_file, weights_only=True)
    assert set(state) == set(source)
    for key in source:  # every tensor from the checkpoint, but the token embedding from the base
        expected = base[key] if key == "token_embedding.weight" else source[key]
        assert torch.equal(state[key], expected), key
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = ["riding a bike", "slide_left", "x"]
    with torch.no_grad():
        prompts, ids = vifi_prompt_embeddings(base["token_embedding.weight"], names, prefix="a video of a")
        torch.testing.assert_close(converted.encode_image(images), vifi_image_features(checkpoint, images),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(converted.encode_text(ids), vifi_text_features(checkpoint, prompts, ids),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(converted.logit_scale, checkpoint["module.logit_scale"])
    assert learned_prompt(tmp_path / "vifi_tiny.pt") is None
    record = torch.load(tmp_path / "vifi_tiny.pt", weights_only=True)["vifi_clip"]
    assert record["prompt_template"] == "a video of a {}." and record["base"] == str(base_file)


def test_learned_context_is_kept_with_the_words_it_replaces(tmp_path, base_file):
    context = torch.randn(2, 32)
    write_checkpoint(tmp_path / "short.pth", random_clip_state(seed=1), context=context)
    result = import_vificlip(VifiImportConfig(checkpoint=tmp_path / "short.pth", out=tmp_path / "short.pt",
                                              base=str(base_file), model=TINY))
    assert result.context_tokens == 2 and "zeroshot uses them" in result.line()
    vectors, prefix = learned_prompt(tmp_path / "short.pt")
    assert torch.equal(vectors, context) and prefix == "a photo of a"  # 4 or fewer start from CTX_INIT's words
    write_checkpoint(tmp_path / "long.pth", random_clip_state(seed=1), context=torch.randn(6, 32), ctx_init=None)
    import_vificlip(VifiImportConfig(checkpoint=tmp_path / "long.pth", out=tmp_path / "long.pt",
                                     base=str(base_file), model=TINY))
    assert learned_prompt(tmp_path / "long.pt")[1] is None  # more than 4: placeholder words, config or not


def test_bridge_and_prompt_towers_compute_what_vifi_clip_computes(tmp_path, base_file):
    """Deep vision and text prompts: the converted towers, the cached block outputs and maps (CLS and patch
    tokens of the prompted tower) and the class embeddings equal ViFi-CLIP's forward with its prompts."""
    source = random_clip_state(seed=1)
    extra, context = bridge_and_prompt(seed=3, context_tokens=5)  # more than 4: placeholder words
    checkpoint = write_checkpoint(tmp_path / "bp.pth", source, context=context, extra=extra)
    result = import_vificlip(VifiImportConfig(checkpoint=tmp_path / "bp.pth", out=tmp_path / "bp.pt",
                                              base=str(base_file), model=TINY))
    assert result.block_prompts == {"image": [0, 1, 2], "text": [1]}
    assert "image prompt tokens in blocks 0-2; text prompt tokens in blocks 1-1" in result.line()
    saved = torch.load(tmp_path / "bp.pt", weights_only=True)["prompts"]
    assert torch.equal(saved["image"][0], extra["module.image_encoder.VPT"].half().float())
    converted, _ = load_clip(TINY, str(tmp_path / "bp.pt"))
    assert set(converted.state_dict()) == set(source)  # the prompts are no open_clip weights
    pixels = torch.randint(0, 256, (1, 3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = pixels[0].float() / 255
    blocks = []
    pre = "module.image_encoder.transformer.resblocks."
    with torch.no_grad():
        expected = vifi_image_features(checkpoint, images, blocks_out=blocks)
        unprompted = vifi_image_features({k: v for k, v in checkpoint.items() if "VPT" not in k}, images)
        assert (expected - unprompted).abs().max() > 0.05  # the prompts matter
        torch.testing.assert_close(converted.encode_image(images), expected, rtol=1e-5, atol=1e-5)
        cached = FrozenBackbone(converted.visual, 2, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(pixels)
        torch.testing.assert_close(cached.embeddings[0], expected, rtol=1e-5, atol=1e-5)
        for k, i in enumerate((2, 3)):  # the last 2 blocks: their CLS and 16 patch tokens; maps from those patches
            torch.testing.assert_close(cached.block_outputs[k][0], blocks[i][:, :17], rtol=1e-5, atol=1e-5)
            block_input = _prompted(blocks[i - 1].transpose(0, 1), checkpoint, f"{pre}{i}.VPT_shallow", None)
            y = _layer_norm(block_input.transpose(0, 1), checkpoint, f"{pre}{i}.ln_1")
            qk = F.linear(y, checkpoint[f"{pre}{i}.attn.in_proj_weight"][:128], checkpoint[f"{pre}{i}.attn.in_proj_bias"][:128])
            qk = qk[:, 1:17].reshape(1, 3, 16, 2, 2, 32)
            prev, nxt = adjacent_maps(qk[..., 0, :, :], qk[..., 1, :, :])
            torch.testing.assert_close(cached.maps_prev[k], prev, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cached.maps_next[k], nxt, rtol=1e-5, atol=1e-5)
        names = ["riding a bike", "slide_left", "x"]
        tower, tokenizer = TextTower(converted), open_clip.get_tokenizer(TINY)
        vectors, prefix = learned_prompt(tmp_path / "bp.pt")
        classes = ClassPrompts(tower, tokenizer, prompt_class_names(names), context_vectors=vectors,
                               context_prefix=prefix)
        base = torch.load(base_file, weights_only=True)
        prompt_embeddings, ids = vifi_prompt_embeddings(base["token_embedding.weight"], names, context)
        text = F.normalize(vifi_text_features(checkpoint, prompt_embeddings, ids), dim=-1)
        torch.testing.assert_close(classes(), text, rtol=1e-5, atol=1e-5)
    with pytest.raises(EvlCacheError, match="text tower's blocks put 5 learned prompt tokens .*--prompt-tokens 5, not 2"):
        ClassPrompts(tower, tokenizer, names, context_tokens=2)


def test_refusals_are_one_line_and_name_the_file(tmp_path, base_file):
    source = random_clip_state(seed=1)
    options = dict(base=str(base_file), model=TINY)

    def attempt(name, **extra):
        return import_vificlip(VifiImportConfig(checkpoint=tmp_path / name, out=tmp_path / f"{name}.pt",
                                                **{**options, **extra}))

    deep = {"module.image_encoder.transformer.resblocks.1.VPT_shallow": torch.zeros(8, 64)}
    write_checkpoint(tmp_path / "deep.pth", source, extra=deep)
    with pytest.raises(CheckpointError, match="deep.pth: has vision prompts of blocks \\[1\\] but no image_encoder.VPT"):
        attempt("deep.pth")
    write_checkpoint(tmp_path / "wide.pth", source, extra={"module.image_encoder.VPT": torch.zeros(8, 48)})
    with pytest.raises(BackboneError, match="wide.pth: image prompts of block 0 have shape \\(8, 48\\): the image "
                                            "tower has blocks 0..3 of width 64"):
        attempt("wide.pth")
    text_deep = {"module.text_encoder.transformer.resblocks.1.VPT_shallow": torch.zeros(4, 32)}
    write_checkpoint(tmp_path / "text_deep.pth", source, extra=text_deep)
    with pytest.raises(CheckpointError, match="text prompts inside the text tower but no prompt_learner.ctx"):
        attempt("text_deep.pth")
    write_checkpoint(tmp_path / "counts.pth", source, context=torch.zeros(3, 32), extra=text_deep)
    with pytest.raises(CheckpointError, match="text prompts of block 1 hold 4 tokens, prompt_learner.ctx 3"):
        attempt("counts.pth")
    write_checkpoint(tmp_path / "no_config.pth", source, context=torch.zeros(3, 32), ctx_init=None)
    with pytest.raises(CheckpointError, match="no_config.pth: its 3 learned context vectors .*holds none"):
        attempt("no_config.pth")
    torch.save({"model": {"module.decoder.cls_token": torch.zeros(64)}}, tmp_path / "evl.pth")
    with pytest.raises(CheckpointError, match="unexpected keys for a ViFi-CLIP checkpoint: decoder.cls_token"):
        attempt("evl.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="empty.pth: no state dict under 'model'"):
        attempt("empty.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pth: cannot read as a torch checkpoint"):
        attempt("text.pth")
    bigger = dict(source)
    bigger["visual.proj"] = torch.zeros(64, 48)
    write_checkpoint(tmp_path / "shape.pth", bigger)
    with pytest.raises(CheckpointError, match="visual.proj has shape \\(64, 48\\), EVL-Tiny needs \\(64, 32\\)"):
        attempt("shape.pth")
    write_checkpoint(tmp_path / "good.pth", source)
    with pytest.raises(BackboneError, match="--base 'nope.pt' is neither openai nor a file"):
        attempt("good.pth", base="nope.pt")
    with pytest.raises(BackboneError, match="ViT-B-16 uses GELU.*-quickgelu"):
        attempt("good.pth", model="ViT-B-16")
    (tmp_path / "taken.pt").write_text("")
    with pytest.raises(EvlCacheError, match="taken.pt: exists already"):
        import_vificlip(VifiImportConfig(checkpoint=tmp_path / "good.pth", out=tmp_path / "taken.pt", **options))


def test_missing_base_download_says_to_pass_a_file(tmp_path):
    """Offline (the tests never reach a hub), --base openai fails naming the checkpoint and --base FILE."""
    write_checkpoint(tmp_path / "vifi.pth", random_clip_state(seed=1))
    result = CliRunner().invoke(main, ["import-vificlip", str(tmp_path / "vifi.pth"), "--out", str(tmp_path / "o.pt")])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # (open_clip logs its own)
    assert len(errors) == 1 and "vifi.pth: could not download OpenAI's CLIP weights for ViT-B-16-quickgelu" in errors[0]
    assert "pass --base /path/to/weights" in errors[0] and not (tmp_path / "o.pt").exists()


# --- export in ViFi-CLIP's layout ---------------------------------------------------------------------------

PROMPT_BUFFERS = ("module.prompt_learner.token_prefix", "module.prompt_learner.token_suffix",
                  "module.prompt_learner.complete_text_embeddings")  # made from class names; ViFi-CLIP drops them


def test_export_writes_what_vifi_clip_saved_back_in_its_names(tmp_path, base_file):
    """A bridge-and-prompt checkpoint imported, then exported: ViFi-CLIP's own keys and tensors (its prompts
    rounded to float16, as its forward rounds them), and the config entries its weights depend on."""
    extra, context = bridge_and_prompt(seed=3, context_tokens=5)
    checkpoint = write_checkpoint(tmp_path / "bp.pth", random_clip_state(seed=1), context=context, extra=extra)
    import_vificlip(VifiImportConfig(checkpoint=tmp_path / "bp.pth", out=tmp_path / "bp.pt", base=str(base_file),
                                     model=TINY))
    exported = torch.load(export_vificlip(VifiExportConfig(towers=tmp_path / "bp.pt", out=tmp_path / "out.pth")),
                          weights_only=True)
    expected = {k: v for k, v in checkpoint.items() if k not in PROMPT_BUFFERS}
    assert set(exported["model"]) == set(expected)
    for key, value in expected.items():
        assert torch.equal(exported["model"][key], value.half().float() if "VPT" in key else value), key
    assert exported["config"]["TRAINER"]["ViFi_CLIP"] == {
        "CTX_INIT": "a photo of a", "N_CTX_TEXT": 5, "N_CTX_VISION": 3, "PROMPT_DEPTH_TEXT": 2,
        "PROMPT_DEPTH_VISION": 3, "PROMPT_MODEL": True}
    write_checkpoint(tmp_path / "plain.pth", random_clip_state(seed=1), ctx_init="a video of a")
    import_vificlip(VifiImportConfig(checkpoint=tmp_path / "plain.pth", out=tmp_path / "plain.pt",
                                     base=str(base_file), model=TINY))
    plain = torch.load(export_vificlip(VifiExportConfig(towers=tmp_path / "plain.pt", out=tmp_path / "p.pth")),
                       weights_only=True)
    assert plain["config"]["TRAINER"]["ViFi_CLIP"]["CTX_INIT"] == "a video of a"
    assert plain["config"]["TRAINER"]["ViFi_CLIP"]["PROMPT_MODEL"] is False


def test_export_refuses_what_vifi_clips_model_cannot_hold(tmp_path):
    clip, _ = load_clip("EVL-Tiny-SL2", "none")  # SigLIP 2's towers: no place in OpenAI's CLIP
    torch.save({"state_dict": clip.state_dict(), "vifi_clip": {"prompt_template": "a photo of a {}."}},
               tmp_path / "siglip.pt")
    with pytest.raises(CheckpointError, match="siglip.pt: .* has no place in ViFi-CLIP's model"):
        export_vificlip(VifiExportConfig(towers=tmp_path / "siglip.pt", out=tmp_path / "a.pth"))
    torch.save({"state_dict": random_clip_state(seed=1)}, tmp_path / "plain_open_clip.pt")
    with pytest.raises(CheckpointError, match="plain_open_clip.pt: not a weights file of finetune or import-vificlip"):
        export_vificlip(VifiExportConfig(towers=tmp_path / "plain_open_clip.pt", out=tmp_path / "b.pth"))
    torch.save({"state_dict": random_clip_state(seed=1), "vifi_clip": {"prompt_template": "{} in a video"}},
               tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="prompt template '{} in a video' is not ViFi-CLIP's"):
        export_vificlip(VifiExportConfig(towers=tmp_path / "odd.pt", out=tmp_path / "c.pth"))
    (tmp_path / "taken.pth").write_text("")
    with pytest.raises(EvlCacheError, match="taken.pth: exists already"):
        export_vificlip(VifiExportConfig(towers=tmp_path / "odd.pt", out=tmp_path / "taken.pth"))


# --- zero-shot from the cache -----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["text-prompted", "bridge-and-prompt"])
def prompted(request, sample_videos, base_file, tmp_path_factory):
    """A ViFi-CLIP checkpoint with 3 learned context vectors in place of the first 3 of its CTX_INIT words
    ("a photo of a"), text-prompted or also with deep vision and text prompts, converted, and a cache
    extracted with ViFi-CLIP's multi-view protocol: 2 temporal views (random segment draws) x 3 crops,
    ImageNet normalisation (and, for the deep-prompted tower, 2 blocks of tokens)."""
    root = tmp_path_factory.mktemp("vifi_cache")
    source = random_clip_state(seed=5)
    context = 0.1 * torch.randn(3, 32, generator=torch.Generator().manual_seed(6))
    extra, blocks = {}, 0
    if request.param == "bridge-and-prompt":
        extra, blocks = bridge_and_prompt(seed=7, context_tokens=3)[0], 2
    checkpoint = write_checkpoint(root / "vifi.pth", source, context=context, extra=extra)
    import_vificlip(VifiImportConfig(checkpoint=root / "vifi.pth", out=root / "vifi_tiny.pt", base=str(base_file),
                                     model=TINY))
    cache = root / "feats.zarr"
    extract(ExtractConfig(out=cache, videos=sample_videos, model=TINY, pretrained=str(root / "vifi_tiny.pt"),
                          frames=4, sampling="vifi", eval_views=2, spatial_views=3, blocks=blocks, workers=0,
                          **IMAGENET))
    base = torch.load(base_file, weights_only=True)
    return cache, checkpoint, context, base["token_embedding.weight"]


def test_zeroshot_equals_vifi_clip_formula_with_the_learned_context(prompted, sample_videos):
    cache, checkpoint, context, token_embedding = prompted
    names, scores, prompts = zeroshot_scores(ZeroShotConfig(features=cache, workers=0))
    assert prompts.context_tokens == 3 and torch.equal(prompts.context.detach(), context)
    with FeatureStore(cache) as store:
        attrs = store.attrs
        paths = store.column("path")
    assert attrs["preprocessing"]["crop"] == "three" and attrs["sampling"]["mode"] == "vifi"
    if "module.image_encoder.VPT" in checkpoint:  # the prompted tower's CLS and 16 patch tokens per frame
        with FeatureStore(cache) as store:
            assert store.array("tokens/block_3").shape[-2:] == (17, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        prompt_embeddings, ids = vifi_prompt_embeddings(token_embedding, names, context)
        text = F.normalize(vifi_text_features(checkpoint, prompt_embeddings, ids), dim=-1)
        scale = checkpoint["module.logit_scale"].exp()
        direct = []
        for video in scores["videos"]:
            clips = read_video_clips(sample_videos / paths[video], "val", int(video), ClipSpec.from_cache(attrs)).clips
            views, frames = clips.shape[:2]
            assert views == 6
            pixels = (clips.flatten(0, 1).float() / 255 - mean) / std
            features = vifi_image_features(checkpoint, pixels).view(views, frames, -1).mean(1)  # mean over frames
            logits = scale * F.normalize(features, dim=-1) @ text.T
            direct.append(logits.softmax(-1).mean(0))  # ViFi-CLIP sums the views' softmax: the same ranking
    direct = torch.stack(direct).numpy()
    assert direct.shape == (8, 4)
    np.testing.assert_allclose(scores["probabilities"], direct, atol=3e-4)  # the cache holds float16 embeddings
    assert (scores["probabilities"].argmax(1) == direct.argmax(1)).all()


def test_zeroshot_command_reports_the_learned_prompt_and_refuses_templates(prompted, tmp_path):
    cache = prompted[0]
    result = CliRunner().invoke(main, ["zeroshot", "--features", str(cache), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "learned prompt context of 3 vectors" in result.output
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\n")
    with pytest.raises(EvlCacheError, match="learned prompt context, which replaces templates"):
        zeroshot(ZeroShotConfig(features=cache, templates=templates, workers=0))
    info = CliRunner().invoke(main, ["info", str(cache), "--json"])
    assert json.loads(info.stdout)["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
