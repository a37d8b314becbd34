"""Tests for evl_cache/model.py against a naive decoder that follows evl-model.md literally.

The naive version loops over patch pairs for the relative positions, projects every token through
W_k and W_v, and uses the model's parameters only (no code shared with the model), so agreement
checks the single-query rewrite, the batched relative-position mix and the parameter layout together.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from evl_cache.decoder.model import DecoderConfig, EVLModel, recording_attention

WIDTH, HEADS, LAYERS = 16, 4, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra threads only add synchronisation, which a busy shared machine makes slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(grid=(2, 3), frames=3, dtype=torch.float32, seed=0, **flags) -> EVLModel:
    """A tiny model in eval mode whose parameters are all random and nonzero (zero-init ones too)."""
    torch.manual_seed(seed)
    config = DecoderConfig(width=WIDTH, grid=grid, frames=frames, num_classes=5, layers=LAYERS,
                           heads=HEADS, **flags)
    model = EVLModel(config).to(dtype).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def make_inputs(model: EVLModel, batch=2, seed=1, dtype=torch.float32):
    """Random block outputs and row-stochastic maps shaped for `model`."""
    config = model.config
    patches = config.grid[0] * config.grid[1]
    generator = torch.Generator().manual_seed(seed)
    block_outputs = [torch.randn(batch, config.frames, config.prefix_tokens + patches, WIDTH, generator=generator,
                                 dtype=dtype)
                     for _ in range(LAYERS)]
    maps_prev, maps_next = ([torch.randn(batch, config.frames - 1, patches, patches, generator=generator,
                                         dtype=dtype).mul(2).softmax(-1) for _ in range(LAYERS)]
                            for _ in range(2))
    return block_outputs, maps_prev, maps_next


# ---------------------------------------------------------------- the naive decoder, written from the spec

def rel(p: int, k: int, grid: tuple[int, int]) -> int:
    h, w = grid
    p_row, p_col, k_row, k_col = p // w, p % w, k // w, k % w
    return (p_row - k_row + h - 1) * (2 * w - 1) + (p_col - k_col + w - 1)


def naive_layer_norm(x, params, name):
    return F.layer_norm(x, x.shape[-1:], params[f"{name}.weight"], params[f"{name}.bias"], eps=1e-5)


def naive_linear(x, params, name):
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def naive_forward(model: EVLModel, block_outputs, maps_prev, maps_next, features_only=False, attentions=None):
    """The model written from the spec; each layer's attention weights [B, H, T*L] go to `attentions`."""
    config = model.config
    params = dict(model.named_parameters())
    h, w = config.grid
    patches, frames = h * w, config.frames
    batch = block_outputs[0].shape[0]
    x = params["decoder.cls_token"].expand(batch, config.width)
    for i in range(config.layers):
        layer = f"decoder.decoder_layers.{i}"
        f = block_outputs[i].to(x.dtype)
        f_new = f.clone()
        if config.temporal_conv:
            weight, bias = params[f"decoder.temporal_conv.{i}.weight"], params[f"decoder.temporal_conv.{i}.bias"]
            for t in range(frames):  # out[t] = b + sum_j weight[j] * f[t + j - 1], zero padding
                f_new[:, t] = f_new[:, t] + bias
                for j in range(3):
                    if 0 <= t + j - 1 < frames:
                        f_new[:, t] = f_new[:, t] + weight[:, 0, j] * f[:, t + j - 1]
        if config.temporal_pos_embed:
            for t in range(frames):
                f_new[:, t] = f_new[:, t] + params[f"decoder.temporal_pos_embed.{i}"][t]
        if config.temporal_cross_attention:
            for name, maps, frame_range, map_index in (
                    ("w1", maps_prev[i], range(1, frames), lambda t: t - 1),
                    ("w2", maps_next[i], range(0, frames - 1), lambda t: t)):
                table = params[f"decoder.cross_attention.{i}.{name}"]
                unrolled = torch.stack([torch.stack([table[rel(p, k, config.grid)] for k in range(patches)])
                                        for p in range(patches)])  # [P, P, C]
                for t in frame_range:
                    term = torch.einsum("bpk,pkc->bpc", maps[:, map_index(t)].to(x.dtype), unrolled)
                    f_new[:, t, config.prefix_tokens:] = f_new[:, t, config.prefix_tokens:] + term
        tokens = naive_layer_norm(f_new.flatten(1, 2), params, f"{layer}.norm3")
        # plain multi-head attention: every token through W_k and W_v
        heads = config.heads
        head_dim = config.qkv_dim // heads
        q = naive_linear(naive_layer_norm(x, params, f"{layer}.norm1"), params, f"{layer}.attn.q_proj")
        k = naive_linear(tokens, params, f"{layer}.attn.k_proj")
        v = naive_linear(tokens, params, f"{layer}.attn.v_proj")
        q = q.view(batch, heads, 1, head_dim)
        k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
        attention = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim), dim=-1)
        if attentions is not None:
            attentions.append(attention[:, :, 0])
        x = x + naive_linear((attention @ v).reshape(batch, config.qkv_dim), params, f"{layer}.attn.out_proj")
        hidden = naive_linear(naive_layer_norm(x, params, f"{layer}.norm2"), params, f"{layer}.mlp.fc1")
        x = x + naive_linear(hidden * torch.sigmoid(1.702 * hidden), params, f"{layer}.mlp.fc2")
    if features_only:
        return x
    return naive_linear(naive_layer_norm(x, params, "proj.0"), params, "proj.2")


def captured_frame_features(model: EVLModel, *inputs) -> list[torch.Tensor]:
    """F' of every layer ([B, T, L, C]), read as the input of norm3 with a forward hook."""
    captured = []
    hooks = [layer.norm3.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
             for layer in model.decoder.decoder_layers]
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    config = model.config
    return [features.view(features.shape[0], config.frames, -1, WIDTH) for features in captured]


# ---------------------------------------------------------------- agreement with the naive decoder

@pytest.mark.parametrize("prefix", [0, 5])
def test_matches_naive_decoder_with_any_number_of_prefix_tokens(prefix):
    """Towers without a class token (SigLIP) or with a class token and registers: the temporal
    cross-attention adds to the patch tokens alone, the query attends to every token."""
    model = make_model((2, 3), 3, prefix_tokens=prefix)
    inputs = make_inputs(model)
    attentions = []
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), naive_forward(model, *inputs, attentions=attentions),
                                   rtol=0, atol=1e-5)
        with recording_attention(model) as recorded:
            model(*inputs)
    assert recorded[0].shape == attentions[0].shape == (2, HEADS, 3 * (prefix + 6))
    with pytest.raises(ValueError, match="expected"):  # a block of another prefix count is refused
        model([torch.zeros(2, 3, 1 + 6, WIDTH)] * LAYERS, *inputs[1:])


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (4, 4)])
@pytest.mark.parametrize("frames", [2, 3, 8])
def test_matches_naive_decoder(grid, frames):
    model = make_model(grid, frames)
    inputs = make_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), naive_forward(model, *inputs), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.features(*inputs), naive_forward(model, *inputs, features_only=True),
                                   rtol=0, atol=1e-5)


def test_recorded_attention_is_the_spec_attention_and_leaves_the_logits_bit_identical():
    model = make_model((2, 3), 3)
    inputs = make_inputs(model)
    expected = []
    with torch.no_grad():
        plain = model(*inputs)
        naive_forward(model, *inputs, attentions=expected)
        with recording_attention(model) as recorded:
            logits = model(*inputs)
        model(*inputs)  # the hooks are gone after the block
    assert torch.equal(logits, plain)
    assert len(recorded) == LAYERS and recorded[0].shape == (2, HEADS, 3 * 7)
    for weights, naive in zip(recorded, expected):
        torch.testing.assert_close(weights, naive, rtol=0, atol=1e-6)
    torch.testing.assert_close(recorded[1].sum(-1), torch.ones(2, HEADS))


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=3)))
def test_matches_naive_decoder_for_every_ablation(flags):
    conv, pos, cross = flags
    model = make_model(temporal_conv=conv, temporal_pos_embed=pos, temporal_cross_attention=cross)
    block_outputs, maps_prev, maps_next = make_inputs(model)
    if not cross:
        maps_prev = maps_next = None
    with torch.no_grad():
        torch.testing.assert_close(model(block_outputs, maps_prev, maps_next),
                                   naive_forward(model, block_outputs, maps_prev, maps_next), rtol=0, atol=1e-5)


def test_gradients_match_naive_decoder():
    model = make_model((2, 3), 3, dtype=torch.float64)
    block_outputs, maps_prev, maps_next = make_inputs(model, dtype=torch.float64)
    for tensor in (*block_outputs, *maps_prev, *maps_next):
        tensor.requires_grad_(True)
    inputs = [*model.parameters(), *block_outputs, *maps_prev, *maps_next]
    weights = torch.randn(2, 5, dtype=torch.float64)
    ours = torch.autograd.grad((model(block_outputs, maps_prev, maps_next) * weights).sum(), inputs)
    naive = torch.autograd.grad((naive_forward(model, block_outputs, maps_prev, maps_next) * weights).sum(),
                                inputs)
    names = [name for name, _ in model.named_parameters()] + ["inputs"] * (3 * LAYERS)
    for name, ours_grad, naive_grad in zip(names, ours, naive):
        if name.endswith("k_proj.bias"):  # the key bias cancels in the softmax: its gradient is zero
            assert ours_grad.abs().max() < 1e-12 and naive_grad.abs().max() < 1e-12, name
            continue
        assert naive_grad.abs().max() > 0, name
        torch.testing.assert_close(ours_grad, naive_grad, rtol=1e-9, atol=1e-10, msg=name)


def test_training_mode_backward_reaches_every_parameter():
    model = make_model().train()
    model(*make_inputs(model)).logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name  # DDP needs every parameter in the graph
        assert parameter.grad.abs().max() > 0 or name.endswith("k_proj.bias"), name


# ---------------------------------------------------------------- where each temporal term goes

@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_each_map_feeds_its_own_frame_and_only_patch_tokens(prefix):
    frames = 4
    model = make_model((2, 3), frames, temporal_conv=False, temporal_pos_embed=False, prefix_tokens=prefix)
    block_outputs, maps_prev, maps_next = make_inputs(model)
    base = captured_frame_features(model, block_outputs, maps_prev, maps_next)[0]
    for t in range(frames - 1):
        changed_prev = [m.clone() for m in maps_prev]
        changed_prev[0][:, t] = changed_prev[0][:, t].flip(-1)  # A_prev[t + 1]
        changed_next = [m.clone() for m in maps_next]
        changed_next[0][:, t] = changed_next[0][:, t].flip(-1)  # A_next[t]
        for changed, frame in ((captured_frame_features(model, block_outputs, changed_prev, maps_next)[0], t + 1),
                               (captured_frame_features(model, block_outputs, maps_prev, changed_next)[0], t)):
            moved = (changed - base).abs().amax(dim=(0, 3))  # [T, L]
            assert moved[frame, prefix:].min() > 0
            assert moved[frame, :prefix].sum() == 0  # the class and register tokens
            assert moved[[f for f in range(frames) if f != frame]].max() == 0


def test_prev_maps_skip_first_frame_and_next_maps_skip_last_frame():
    frames = 3
    model = make_model((2, 3), frames, temporal_conv=False, temporal_pos_embed=False)
    block_outputs, maps_prev, maps_next = make_inputs(model)
    zeros = [torch.zeros_like(m) for m in maps_prev]
    for i, block_output in enumerate(block_outputs):
        only_prev = captured_frame_features(model, block_outputs, maps_prev, zeros)[i] - block_output
        only_next = captured_frame_features(model, block_outputs, zeros, maps_next)[i] - block_output
        assert only_prev[:, 0].abs().max() < 1e-6 < only_prev[:, 1:, 1:].abs().amin(dim=(0, 2, 3)).min()
        assert only_next[:, -1].abs().max() < 1e-6 < only_next[:, :-1, 1:].abs().amin(dim=(0, 2, 3)).min()
        assert only_prev[:, :, 0].abs().max() < 1e-6 and only_next[:, :, 0].abs().max() < 1e-6


def test_cross_attention_term_is_the_relative_position_sum():
    model = make_model((3, 2), 3, temporal_conv=False, temporal_pos_embed=False)
    block_outputs, maps_prev, maps_next = make_inputs(model)
    zeros = [torch.zeros_like(m) for m in maps_prev]
    term = captured_frame_features(model, block_outputs, maps_prev, zeros)[1] - block_outputs[1]
    table = model.decoder.cross_attention[1].w1.detach()
    b, t, p = 1, 2, 4
    expected = sum(maps_prev[1][b, t - 1, p, k] * table[rel(p, k, (3, 2))] for k in range(6))
    torch.testing.assert_close(term[b, t, 1 + p], expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- ablations

@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=3)))
def test_ablation_removes_parameters_and_frame_order(flags):
    conv, pos, cross = flags
    model = make_model(temporal_conv=conv, temporal_pos_embed=pos, temporal_cross_attention=cross)
    keys = set(model.state_dict())
    for present, part in ((conv, "decoder.temporal_conv."), (pos, "decoder.temporal_pos_embed."),
                          (cross, "decoder.cross_attention.")):
        assert any(key.startswith(part) for key in keys) == present, part
    block_outputs, maps_prev, maps_next = make_inputs(model, batch=3)
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        logits = model(block_outputs, maps_prev, maps_next)
        shuffled = model([b[:, order] for b in block_outputs], maps_prev, maps_next)
    if any(flags):
        assert (logits - shuffled).abs().max() > 1e-3
    else:
        torch.testing.assert_close(logits, shuffled, rtol=0, atol=1e-5)


def test_cross_attention_needs_maps_and_others_do_not():
    model = make_model()
    block_outputs, _, _ = make_inputs(model)
    with pytest.raises(ValueError, match="maps"):
        model(block_outputs, None, None)
    ablated = make_model(temporal_cross_attention=False)
    assert ablated(block_outputs).shape == (2, 5)


# ---------------------------------------------------------------- names, shapes, init, dtypes

def test_state_dict_names_are_the_authors_checkpoint_names():
    config = DecoderConfig(width=WIDTH, grid=(2, 3), frames=3, num_classes=5, layers=LAYERS, heads=HEADS)
    state = EVLModel(config).state_dict()
    expected = {"decoder.cls_token", "proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
    for i in range(LAYERS):
        layer = f"decoder.decoder_layers.{i}"
        expected |= {f"{layer}.attn.{p}_proj.{t}" for p in ("q", "k", "v", "out") for t in ("weight", "bias")}
        expected |= {f"{layer}.mlp.{p}.{t}" for p in ("fc1", "fc2") for t in ("weight", "bias")}
        expected |= {f"{layer}.norm{n}.{t}" for n in (1, 2, 3) for t in ("weight", "bias")}
        expected |= {f"decoder.temporal_conv.{i}.weight", f"decoder.temporal_conv.{i}.bias",
                     f"decoder.temporal_pos_embed.{i}",
                     f"decoder.cross_attention.{i}.w1", f"decoder.cross_attention.{i}.w2"}
    assert set(state) == expected
    assert state["decoder.cls_token"].shape == (WIDTH,)
    assert state["decoder.temporal_pos_embed.0"].shape == (3, WIDTH)
    assert state["decoder.cross_attention.0.w1"].shape == (3 * 5, WIDTH)
    assert state["decoder.temporal_conv.0.weight"].shape == (WIDTH, 1, 3)
    assert state["decoder.decoder_layers.0.mlp.fc1.weight"].shape == (4 * WIDTH, WIDTH)
    assert state["proj.2.weight"].shape == (5, WIDTH)
    checkpoint = {f"module.{key}": value for key, value in make_model().state_dict().items()}
    EVLModel(config).load_state_dict({key.removeprefix("module."): v for key, v in checkpoint.items()})


def test_initialisation():
    config = DecoderConfig(width=64, grid=(2, 2), frames=4, num_classes=3, layers=1, heads=4)
    torch.manual_seed(0)
    decoder = EVLModel(config).decoder
    assert decoder.temporal_pos_embed[0].abs().max() == 0
    assert decoder.cross_attention[0].w1.abs().max() == 0 and decoder.cross_attention[0].w2.abs().max() == 0
    attn = decoder.decoder_layers[0].attn
    bound = math.sqrt(6 / (64 + 64))
    for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
        assert linear.bias.abs().max() == 0
        assert 0.8 * bound < linear.weight.abs().max() <= bound
    assert 0.01 < decoder.cls_token.std() < 0.03


def test_low_precision_inputs_and_autocast():
    model = make_model()
    block_outputs, maps_prev, maps_next = make_inputs(model)
    half = [b.to(torch.float16) for b in block_outputs]
    with torch.no_grad():
        reference = model([b.float() for b in half], maps_prev, maps_next)
        torch.testing.assert_close(model(half, [m.half() for m in maps_prev], [m.half() for m in maps_next]),
                                   reference, rtol=0, atol=1e-2)
        torch.testing.assert_close(model(half, maps_prev, maps_next), reference, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(half, maps_prev, maps_next)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_wrong_frame_count_or_shapes_raise():
    model = make_model(frames=3)
    block_outputs, maps_prev, maps_next = make_inputs(make_model(frames=4))
    with pytest.raises(ValueError, match="frames=3"):
        model(block_outputs, maps_prev, maps_next)
    block_outputs, maps_prev, maps_next = make_inputs(model)
    with pytest.raises(ValueError, match="block outputs"):
        model(block_outputs[:1], maps_prev, maps_next)
    with pytest.raises(ValueError, match="maps"):
        model(block_outputs, [m[:, :1] for m in maps_prev], maps_next)
    with pytest.raises(ValueError, match="divisible"):
        DecoderConfig(width=10, grid=(2, 2), frames=2, num_classes=2, heads=4)
