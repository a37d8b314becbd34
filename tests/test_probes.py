"""The frozen-probe heads against plain computations written from their definitions (decoder/probes.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from evl_cache.decoder.probes import AttentiveProbe, AttentiveProbeConfig, LinearProbe, LinearProbeConfig

WIDTH, HEADS, FRAMES, PATCHES = 16, 4, 3, 6


def make_probe(prefix=1, queries=1, depth=1, seed=0) -> AttentiveProbe:
    """A probe in eval mode whose parameters are all random and nonzero."""
    torch.manual_seed(seed)
    probe = AttentiveProbe(AttentiveProbeConfig(WIDTH, prefix + PATCHES, FRAMES, 5, HEADS, queries, depth)).eval()
    with torch.no_grad():
        for parameter in probe.parameters():
            parameter.normal_(0.0, 0.5)
    return probe


def tokens_of(probe: AttentiveProbe, batch=2, seed=1) -> torch.Tensor:
    return torch.randn(batch, FRAMES, probe.config.tokens, WIDTH, generator=torch.Generator().manual_seed(seed))


def plain_attention(queries, keys_values, q_w, q_b, k_w, k_b, v_w, v_b, out_w, out_b):
    """Multi-head attention with every token projected through W_k and W_v."""
    batch, count, _ = queries.shape
    head_dim = WIDTH // HEADS
    q = (queries @ q_w.T + q_b).view(batch, count, HEADS, head_dim).transpose(1, 2)
    k = (keys_values @ k_w.T + k_b).view(batch, -1, HEADS, head_dim).transpose(1, 2)
    v = (keys_values @ v_w.T + v_b).view(batch, -1, HEADS, head_dim).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, count, WIDTH) @ out_w.T + out_b


def plain_probe(probe: AttentiveProbe, tokens: torch.Tensor) -> torch.Tensor:
    """The probe from its parameters: the queries over the normalised tokens of all frames, an MLP, the
    self-attention blocks, the queries' mean, LayerNorm, the classifier."""
    p = dict(probe.named_parameters())

    def norm(x, name):
        return F.layer_norm(x, (WIDTH,), p[f"{name}.weight"], p[f"{name}.bias"])

    def mlp(x, name):
        return F.gelu(x @ p[f"{name}.0.weight"].T + p[f"{name}.0.bias"]) @ p[f"{name}.2.weight"].T + p[f"{name}.2.bias"]

    queries = p["query_tokens"].expand(len(tokens), -1, -1)
    a = "cross.attn"
    queries = queries + plain_attention(queries, norm(tokens.flatten(1, 2), "cross.norm1"),
                                        *(p[f"{a}.{n}_proj.{w}"] for n in "qkv" for w in ("weight", "bias")),
                                        p[f"{a}.out_proj.weight"], p[f"{a}.out_proj.bias"])
    queries = queries + mlp(norm(queries, "cross.norm2"), "cross.mlp")
    for i in range(len(probe.blocks)):
        b = f"blocks.{i}"
        normed = norm(queries, f"{b}.norm1")
        in_w, in_b = p[f"{b}.attn.in_proj_weight"].chunk(3), p[f"{b}.attn.in_proj_bias"].chunk(3)
        queries = queries + plain_attention(normed, normed, in_w[0], in_b[0], in_w[1], in_b[1], in_w[2], in_b[2],
                                            p[f"{b}.attn.out_proj.weight"], p[f"{b}.attn.out_proj.bias"])
        queries = queries + mlp(norm(queries, f"{b}.norm2"), f"{b}.mlp")
    return norm(queries.mean(1), "norm") @ p["head.weight"].T + p["head.bias"]


@pytest.mark.parametrize("prefix, queries, depth", [(1, 1, 1), (0, 1, 1), (5, 3, 1), (1, 2, 3)])
def test_the_attentive_probe_is_its_definition(prefix, queries, depth):
    probe = make_probe(prefix, queries, depth)
    tokens = tokens_of(probe)
    with torch.no_grad():
        torch.testing.assert_close(probe([tokens]), plain_probe(probe, tokens), rtol=0, atol=1e-5)


def test_it_reads_every_token_of_every_frame_of_the_last_block_and_no_maps():
    probe = make_probe(prefix=5)
    tokens = tokens_of(probe).requires_grad_()
    earlier = tokens_of(probe, seed=2)
    logits = probe([earlier, tokens], [torch.rand(2, FRAMES - 1, PATCHES, PATCHES)], None)
    logits.sum().backward()
    assert (tokens.grad.abs().sum(-1) > 0).all()  # prefix and patch tokens of every frame
    with torch.no_grad():
        torch.testing.assert_close(probe([tokens]), logits)
    with pytest.raises(ValueError, match="expected"):
        probe([torch.zeros(2, FRAMES, PATCHES, WIDTH)])  # another prefix count


def test_initialisation_follows_vjepas_attentive_pooler():
    torch.manual_seed(0)
    probe = AttentiveProbe(AttentiveProbeConfig(256, 10, 2, 7, 8, queries=1, depth=2))
    for name, parameter in probe.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            assert parameter.abs().max() == 0, name
    assert probe.cross.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert probe.cross.attn.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.03)
    assert probe.blocks[0].mlp[2].weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.03)
    assert probe.query_tokens.std().item() == pytest.approx(0.02, rel=0.2)


def test_the_linear_probe_is_a_linear_map_of_the_mean_embedding():
    torch.manual_seed(0)
    probe = LinearProbe(LinearProbeConfig(embed_dim=8, frames=4, num_classes=3))
    embeddings = torch.randn(2, 4, 8).half()
    expected = embeddings.float().mean(1) @ probe.head.weight.T + probe.head.bias
    torch.testing.assert_close(probe(embeddings), expected)
