"""ViFi-CLIP's model on open_clip towers: its forward is ViFi-CLIP's formula (`vifi_reference`, from the same
tensors), fine-tuned or prompted, and only what `tune` names (or the prompts) learns."""
import pytest
import torch
import torch.nn.functional as F
from vifi_reference import (
    TINY,
    random_clip_state,
    vifi_image_features,
    vifi_layout,
    vifi_prompt_embeddings,
    vifi_text_features,
)

from evl_cache.errors import EvlCacheError
from evl_cache.towers.backbone import load_clip
from evl_cache.tuning.vifi_model import PromptSpec, VideoCLIP

NAMES = ["slide_left", "red still", "x"]
CLIP_NORMALISATION = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def tiny_clip(seed=1):
    """A tiny open_clip CLIP with every tensor random, and its tokenizer."""
    import open_clip

    clip, _ = load_clip(TINY, "none", seed=seed)
    clip.load_state_dict(random_clip_state(seed))
    return clip, open_clip.get_tokenizer(TINY)


def video_clip(tune="both", spec=PromptSpec(), seed=1):
    clip, tokenizer = tiny_clip(seed)
    return VideoCLIP(clip, tokenizer, NAMES, tune, spec, *CLIP_NORMALISATION, seed=0).eval()


def vifi_logits(p, pixels, names, context=None):
    """ViFi-CLIP's forward from its state dict `p`: frames through the image encoder, mean over frames,
    prompts through the text encoder, logit_scale.exp() x cosine."""
    batch, frames = pixels.shape[:2]
    video = vifi_image_features(p, pixels.flatten(0, 1)).view(batch, frames, -1).mean(1)
    prompts, ids = vifi_prompt_embeddings(p["token_embedding"], names, context)
    text = vifi_text_features(p, prompts, ids)
    return p["module.logit_scale"].exp() * F.normalize(video, dim=-1) @ F.normalize(text, dim=-1).T


def test_the_fine_tuned_models_forward_is_vifi_clips_formula():
    model = video_clip("both")
    p = vifi_layout(model.open_clip_state())
    p["token_embedding"] = model.open_clip_state()["token_embedding.weight"]
    pixels = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), vifi_logits(p, pixels, NAMES), rtol=1e-5, atol=1e-5)
    clips = torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(1, 1, 3, 1, 1) for v in CLIP_NORMALISATION)
    torch.testing.assert_close(model.pixels(clips), (clips.float() / 255 - mean) / std)


def test_the_prompted_models_forward_is_vifi_clips_formula_with_its_prompts():
    """Deep vision prompts (input and blocks 1, 2), learned text context of 3 vectors started from the
    prompt words, deep text prompts in block 1; every prompt set to random values so that they matter."""
    spec = PromptSpec("a photo of a", text_tokens=3, text_depth=2, vision_tokens=2, vision_depth=3)
    model = video_clip("none", spec)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    state = model.open_clip_state()
    p = vifi_layout(state)
    p["token_embedding"] = state["token_embedding.weight"]
    prompts = model.block_prompts()
    assert sorted(prompts["image"]) == [0, 1, 2] and sorted(prompts["text"]) == [1]
    p["module.image_encoder.VPT"] = prompts["image"][0]
    for block in (1, 2):
        p[f"module.image_encoder.transformer.resblocks.{block}.VPT_shallow"] = prompts["image"][block]
    p["module.text_encoder.transformer.resblocks.1.VPT_shallow"] = prompts["text"][1]
    context = model.prompts.context.detach()
    pixels = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vifi_logits(p, pixels, NAMES, context)  # underscores as spaces, as ViFi-CLIP's prompter
        torch.testing.assert_close(model(pixels), expected, rtol=1e-5, atol=1e-5)
        unprompted = vifi_logits({k: v for k, v in p.items() if "VPT" not in k}, pixels, NAMES, context)
        assert (expected - unprompted).abs().max() > 0.05  # the block prompts matter
    assert model.prompt_record()["context_prefix"] == "a photo of a"


@pytest.mark.parametrize("tune, trained", [
    ("both", {"visual.", "prompts.tower.", "logit_scale"}),
    ("image", {"visual."}),
    ("text", {"prompts.tower."}),
])
def test_only_what_tune_names_trains(tune, trained):
    model = video_clip(tune)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {prefix for prefix in trained for name in names if name.startswith(prefix)} == trained
    assert all(name.startswith(tuple(trained)) for name in names)
    assert "prompts.tower.token_embedding.weight" not in names  # ViFi-CLIP never trains it
    assert set(model.rebuilt_prefixes) == set(model.state_dict()) - names


def test_prompts_only_train_with_frozen_towers():
    spec = PromptSpec(text_tokens=2, text_depth=2, vision_tokens=4, vision_depth=2)
    model = video_clip("none", spec)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names == {"prompts.context", "visual.block_prompts.block0", "visual.block_prompts.block1",
                     "prompts.tower.transformer.block_prompts.block1"}
    pixels = torch.randn(1, 2, 3, 32, 32)
    model.train()
    model(pixels).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert not any(k.startswith("visual.block_prompts") for k in model.open_clip_state())


def test_context_starts_from_the_prompt_words_or_placeholders():
    clip, tokenizer = tiny_clip()
    model = video_clip("none", PromptSpec("a photo of a", text_tokens=2))
    ids = tokenizer(["a photo of a"])[0, 1:3]
    torch.testing.assert_close(model.prompts.context.detach(), clip.token_embedding(ids).detach())
    assert model.prompts.prompts(["slide left"]) == ["a photo of a slide left."]
    long = video_clip("none", PromptSpec("a photo of a", text_tokens=5))
    assert long.prompts.overwritten_words is None and long.prompt_record().keys() == {"text_context"}
    assert float(long.prompts.context.detach().std()) < 0.05  # normal, std 0.02
    assert video_clip("both").prompt_record() == {"prompt_template": "a photo of a {}."}
    with pytest.raises(EvlCacheError, match="'a photo' has 2 tokens, fewer than the --text-prompt-tokens 3"):
        video_clip("none", PromptSpec("a photo", text_tokens=3))


@pytest.mark.parametrize("tune, spec, message", [
    ("none", PromptSpec(), "--tune none without prompt tokens trains nothing"),
    ("both", PromptSpec(text_tokens=2), "use --tune none, not --tune both"),
    ("none", PromptSpec(vision_tokens=2), "vision prompts need text prompts too"),
    ("none", PromptSpec(text_tokens=2, text_depth=0), "--text-prompt-depth must be 1"),
    ("none", PromptSpec(text_tokens=-1), "--text-prompt-tokens must be 0 or more"),
])
def test_prompt_settings_vifi_clip_cannot_have_are_refused(tune, spec, message):
    with pytest.raises(EvlCacheError, match=message):
        spec.check(tune)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    spec = PromptSpec(text_tokens=2, text_depth=2, vision_tokens=2, vision_depth=2)
    pixels = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = video_clip("none", spec).train()
        model.clip_model[0].set_grad_checkpointing(checkpointing)
        loss = model(pixels).logsumexp(-1).sum()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for plain, recomputed in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(plain, recomputed)
