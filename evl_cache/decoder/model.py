"""The EVL decoder and classification head (docs: evl-model.md, sections 3, 4, 7 and 8).

The model reads what the cache holds: the outputs of the last N backbone blocks, [B, T, L, C] each
(L = the tower's prefix tokens, 0, 1 or a class token and registers, then its P patch tokens), and for
each of them the adjacent-frame attention maps, [B, T-1, P, P]. The temporal cross-attention adds to the
patch tokens only; the query attends to every token. Parameter names are the
authors' checkpoint names without DataParallel's `module.` prefix, so their checkpoints load as they
are. When a temporal part is switched off its parameters are absent, so the state dict shows the
ablation.

Two exact reorderings make it cheap; the weights and the function are the authors':
- The decoder has one query, so its attention never projects the T*L tokens through W_k and W_v
  (`Attention`).
- The temporal cross-attention gathers its relative-position table into a (2h-1)*w*w*C block shared
  by the whole batch instead of a P*P*C one, and mixes it row by row (`_RelativePositionMix`).

Initialisation (sections 3 and 4, and the authors' release where the spec leaves it open):
q/k/v/out projections xavier-uniform with zero biases; MLP weights xavier-uniform with biases
normal(std=1e-6); the query token normal(std=0.02); position embeddings and cross-attention tables
zero, so at initialisation the only temporal part is the convolution; convolutions, LayerNorms and the
head's Linear keep PyTorch's defaults, as in the authors' release whose recipe was tuned with them.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class DecoderConfig:
    """Shape and options of an EVL decoder and its classification head."""

    width: int  # C, the backbone width (from the cache)
    grid: tuple[int, int]  # (h, w) patch grid
    frames: int  # T
    num_classes: int
    layers: int = 4  # N decoder layers; layer i reads the i-th of the last N cached blocks
    heads: int = 12  # H_dec
    qkv_dim: int | None = None  # default = width
    mlp_factor: float = 4.0
    mlp_dropout: float = 0.5
    head_dropout: float = 0.5
    temporal_conv: bool = True
    temporal_pos_embed: bool = True
    temporal_cross_attention: bool = True
    prefix_tokens: int = 1  # tokens before the patches in each frame (class, registers); runs before it: 1

    def __post_init__(self) -> None:
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        if self.qkv_dim is None:
            self.qkv_dim = self.width
        if self.qkv_dim % self.heads:
            raise ValueError(f"qkv_dim {self.qkv_dim} is not divisible by heads {self.heads}")
        if min(self.width, *self.grid, self.frames, self.num_classes, self.layers) < 1 or self.prefix_tokens < 0:
            raise ValueError(f"sizes must be positive: {self}")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least float32 whatever the input dtype (as CLIP and EVL do), cast back."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP and of EVL's decoder MLP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head attention of one query (or a few) over many tokens (evl-model.md section 8).

    Exactly the attention of separate q/k/v/out projections, reordered so that the tokens are never
    projected: per head h the logits are ((W_k,h^T q_h) . y_j + q_h . b_k,h) / sqrt(d) (the key-bias
    term is the same for every token), and the output is W_v,h (sum_j a_hj y_j) + b_v,h (the weights
    sum to one, so the value bias passes through). Queries are [B, C] (EVL's one) or [B, Q, C].
    """

    def __init__(self, width: int, qkv_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, qkv_dim)
        self.k_proj = nn.Linear(width, qkv_dim)
        self.v_proj = nn.Linear(width, qkv_dim)
        self.out_proj = nn.Linear(qkv_dim, width)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def weights(self, query: Tensor, tokens: Tensor) -> Tensor:
        """The softmax weights [B, H, J] (queries [B, Q, C]: [B, Q, H, J]) of the queries over tokens
        [B, J, C] (both already normalised)."""
        queries = query if query.dim() == 3 else query.unsqueeze(1)
        batch, count, width = queries.shape
        heads = self.heads
        head_dim = self.q_proj.out_features // heads
        q = self.q_proj(queries).reshape(batch * count, heads, head_dim)
        q_through_k = torch.einsum("bhd,hdc->bhc", q, self.k_proj.weight.view(heads, head_dim, width))
        q_through_k = q_through_k.reshape(batch, count * heads, width)
        # q_h . b_k,h is the same for every token, so the softmax cancels it: it is left out. The key bias
        # stays in the graph through a term that is exactly zero, so its gradient is exactly zero (not
        # None, for DDP; and not rounding noise, which AdamW would blow up into full-size random steps).
        logits = q_through_k @ tokens.transpose(1, 2) / math.sqrt(head_dim) + 0.0 * self.k_proj.bias.sum()
        weights = torch.softmax(logits, dim=-1).view(batch, count, heads, -1)
        return weights if query.dim() == 3 else weights[:, 0]

    def forward(self, query: Tensor, tokens: Tensor) -> Tensor:
        """queries [B, C] or [B, Q, C] attend to tokens [B, J, C] (both already normalised); returns the
        queries' shape."""
        queries = query if query.dim() == 3 else query.unsqueeze(1)
        batch, count, width = queries.shape
        heads = self.heads
        head_dim = self.q_proj.out_features // heads
        weights = self.weights(queries, tokens).view(batch, count * heads, -1)
        mixed = (weights @ tokens).reshape(batch * count, heads, width)  # [B*Q, H, C]
        values = torch.einsum("bhc,hdc->bhd", mixed, self.v_proj.weight.view(heads, head_dim, width))
        values = values + self.v_proj.bias.view(heads, head_dim)
        out = self.out_proj(values.reshape(batch, count, heads * head_dim))
        return out if query.dim() == 3 else out[:, 0]


@contextmanager
def recording_attention(model: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, every decoder layer's forward appends its query's attention weights [B, H, T*L]
    (tokens in frame-major order, the prefix tokens first in each frame; several queries: averaged over
    them) to the yielded list, in layer order.

    A forward hook recomputes the weights from the layer's own inputs with `Attention.weights`, so the
    model's outputs are exactly those it gives without recording.
    """
    recorded: list[Tensor] = []

    def record(module: Attention, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        weights = module.weights(*inputs).detach()
        recorded.append(weights.mean(1) if weights.dim() == 4 else weights)

    handles = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, Attention)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


class DecoderLayer(nn.Module):
    """x = x + Attn(norm1(x), norm3(F'));  x = x + MLP(norm2(x))."""

    def __init__(self, width: int, qkv_dim: int, heads: int, mlp_factor: float, mlp_dropout: float):
        super().__init__()
        hidden = round(mlp_factor * width)
        self.attn = Attention(width, qkv_dim, heads)
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(width, hidden),
            act=QuickGELU(),
            dropout=nn.Dropout(mlp_dropout),
            fc2=nn.Linear(hidden, width),
        ))
        for linear in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)
        self.norm1 = LayerNorm(width)
        self.norm2 = LayerNorm(width)
        self.norm3 = LayerNorm(width)

    def forward(self, x: Tensor, frame_features: Tensor) -> Tensor:
        """x [B, C], frame_features F' flattened to [B, T*L, C]; returns the updated x [B, C]."""
        x = x + self.attn(self.norm1(x), self.norm3(frame_features))
        return x + self.mlp(self.norm2(x))


def _window_index(grid: tuple[int, int]) -> Tensor:
    """Index [w, 2h-1, w] into the relative-position table, the same for every query row.

    For query patch (r, pc) and key patch (kr, kc), rel = (r - kr + h - 1)(2w - 1) + (pc - kc + w - 1).
    With j = kr - r + h - 1 this is (2h - 2 - j)(2w - 1) + (pc - kc + w - 1), which does not depend on
    r; the key rows of query row r are the window j = h-1-r ... 2h-2-r.
    """
    h, w = grid
    j = torch.arange(2 * h - 1).view(1, -1, 1)
    pc = torch.arange(w).view(-1, 1, 1)
    kc = torch.arange(w).view(1, 1, -1)
    return (2 * h - 2 - j) * (2 * w - 1) + (pc - kc + w - 1)


class _RelativePositionMix(torch.autograd.Function):
    """out[m, p] = sum_k maps[m, p, k] * table[rel(p, k)] for maps [M, P, P], table [R, C] -> [M, P, C].

    Exact, with the minimum P*P*C multiply-adds per map, and without the [P, P, C] gather of the table:
    the table is gathered once per call into rows [w, 2h-1, w, C], shared by the whole batch, and each
    query row r of the grid reads a contiguous window of it as a [w, P, C] batch of matrices. A custom
    backward accumulates into that window in place (autograd would zero-fill a full copy per row).
    """

    @staticmethod
    def forward(ctx, maps: Tensor, table: Tensor, index: Tensor) -> Tensor:
        w, rows = index.shape[0], index.shape[1]
        h = (rows + 1) // 2
        count, patches, _ = maps.shape
        table_rows = table[index]  # [w, 2h-1, w, C]
        out = maps.new_empty(h, w, count, table.shape[1])
        for r in range(h):
            window = table_rows[:, h - 1 - r:2 * h - 1 - r].reshape(w, patches, -1)
            torch.bmm(maps[:, r * w:(r + 1) * w].transpose(0, 1), window, out=out[r])
        ctx.save_for_backward(maps, table_rows if ctx.needs_input_grad[0] else None, index)
        ctx.table_shape = table.shape
        return out.view(patches, count, -1).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        maps, table_rows, index = ctx.saved_tensors
        w, h = index.shape[0], (index.shape[1] + 1) // 2
        count, patches, _ = maps.shape
        grad = grad_out.transpose(0, 1).reshape(h, w, count, -1)  # [r, pc, m, C]
        grad_maps = torch.empty_like(maps) if ctx.needs_input_grad[0] else None
        grad_rows = grad_out.new_zeros(*index.shape, grad_out.shape[-1]) if ctx.needs_input_grad[1] else None
        for r in range(h):
            if grad_maps is not None:
                window = table_rows[:, h - 1 - r:2 * h - 1 - r].reshape(w, patches, -1)
                grad_maps[:, r * w:(r + 1) * w] = torch.bmm(grad[r], window.transpose(1, 2)).transpose(0, 1)
            if grad_rows is not None:
                grad_window = grad_rows[:, h - 1 - r:2 * h - 1 - r].view(w, patches, -1)
                grad_window.baddbmm_(maps[:, r * w:(r + 1) * w].permute(1, 2, 0), grad[r])
        grad_table = None
        if grad_rows is not None:
            grad_table = grad_rows.new_zeros(ctx.table_shape)
            grad_table.index_add_(0, index.reshape(-1), grad_rows.reshape(-1, ctx.table_shape[1]))
        return grad_maps, grad_table, None


class TemporalCrossAttention(nn.Module):
    """The cross-frame term of the local temporal module: sum_k A[t][p, k] * W[rel(p, k)], per map."""

    def __init__(self, grid: tuple[int, int], width: int):
        super().__init__()
        h, w = grid
        self.w1 = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), width))  # for A_prev
        self.w2 = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), width))  # for A_next
        self.register_buffer("window_index", _window_index(grid), persistent=False)

    def forward(self, maps_prev: Tensor, maps_next: Tensor) -> tuple[Tensor, Tensor]:
        """maps [B, T-1, P, P] each -> the terms of frames 1..T-1 and of frames 0..T-2, [B, T-1, P, C] each."""
        device_type = maps_prev.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.w1.dtype
        terms = []
        for maps, table in ((maps_prev, self.w1), (maps_next, self.w2)):
            batch, pairs, patches, _ = maps.shape
            flat_maps = maps.reshape(batch * pairs, patches, patches).to(dtype)
            term = _RelativePositionMix.apply(flat_maps, table.to(dtype), self.window_index)
            terms.append(term.reshape(batch, pairs, patches, -1))
        return terms[0], terms[1]


class Decoder(nn.Module):
    """EVL's decoder (section 3): a learned query reads the last N blocks, one decoder layer each."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        width, frames, layers = config.width, config.frames, config.layers
        self.config = config
        self.cls_token = nn.Parameter(torch.empty(width))  # the query x, [C], shared by every clip
        nn.init.normal_(self.cls_token, std=0.02)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(width, config.qkv_dim, config.heads, config.mlp_factor, config.mlp_dropout)
            for _ in range(layers)
        )
        self.temporal_conv = nn.ModuleList(
            nn.Conv1d(width, width, kernel_size=3, padding=1, groups=width) for _ in range(layers)
        ) if config.temporal_conv else None
        self.temporal_pos_embed = nn.ParameterList(
            nn.Parameter(torch.zeros(frames, width)) for _ in range(layers)
        ) if config.temporal_pos_embed else None
        self.cross_attention = nn.ModuleList(
            TemporalCrossAttention(config.grid, width) for _ in range(layers)
        ) if config.temporal_cross_attention else None

    def forward(self, block_outputs: list[Tensor], maps_prev: list[Tensor] | None,
                maps_next: list[Tensor] | None) -> Tensor:
        """The decoder output x [B, C]; arguments as in `EVLModel.forward`."""
        self._check_inputs(block_outputs, maps_prev, maps_next)
        batch = block_outputs[0].shape[0]
        x = self.cls_token.expand(batch, -1)
        device_type = block_outputs[0].device.type
        # F in the model's dtype (float32), or under autocast in its dtype: a float32 copy of every cached
        # block would double the memory the features take, and autocast would cast it back for the conv
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.cls_token.dtype
        for i, layer in enumerate(self.decoder_layers):
            features = self._local_temporal(i, block_outputs[i].to(dtype), maps_prev, maps_next)
            x = layer(x, features.flatten(1, 2))
        return x

    def _local_temporal(self, i: int, block_output: Tensor, maps_prev: list[Tensor] | None,
                        maps_next: list[Tensor] | None) -> Tensor:
        """F' = F + TConv(F) + P[t] + TCA(A_prev, A_next) for layer i; every term reads the original F."""
        count, width = block_output.shape[1], block_output.shape[3]
        out = block_output
        if self.temporal_conv is not None:
            # F + TConv(F) as one depthwise conv along t, the identity folded into the centre tap. [B, T, L, C]
            # is a channels-last [B, C, T, L], so a (3, 1) conv2d reads it in place (Conv1d would need
            # two transposed copies).
            conv = self.temporal_conv[i]
            kernel = conv.weight.unsqueeze(-1).clone()  # [C, 1, 3, 1]
            kernel[:, :, 1] += 1
            along_t = F.conv2d(block_output.permute(0, 3, 1, 2), kernel, conv.bias, padding=(1, 0), groups=width)
            out = along_t.permute(0, 2, 3, 1)
        if self.temporal_pos_embed is not None:
            out = out + self.temporal_pos_embed[i].to(out.dtype).view(1, count, 1, width)
        if self.cross_attention is not None:
            prev_term, next_term = self.cross_attention[i](maps_prev[i], maps_next[i])
            # A_prev[t] feeds frames 1..T-1, A_next[t] frames 0..T-2; the prefix tokens get nothing.
            prefix = self.config.prefix_tokens
            out = out + F.pad(prev_term, (0, 0, prefix, 0, 1, 0)) + F.pad(next_term, (0, 0, prefix, 0, 0, 1))
        return out

    def _check_inputs(self, block_outputs: list[Tensor], maps_prev: list[Tensor] | None,
                      maps_next: list[Tensor] | None) -> None:
        config = self.config
        if len(block_outputs) != config.layers:
            raise ValueError(f"expected {config.layers} block outputs, got {len(block_outputs)}")
        batch, patches = block_outputs[0].shape[0], config.grid[0] * config.grid[1]
        expected = (batch, config.frames, config.prefix_tokens + patches, config.width)
        for block_output in block_outputs:
            if tuple(block_output.shape) != expected:
                raise ValueError(f"block output of shape {tuple(block_output.shape)}, expected [B, T, L, C] "
                                 f"= {list(expected)} (frames={config.frames}, grid={config.grid})")
        if self.cross_attention is None:
            return
        if maps_prev is None or maps_next is None:
            raise ValueError("temporal cross-attention needs maps_prev and maps_next")
        if len(maps_prev) != config.layers or len(maps_next) != config.layers:
            raise ValueError(f"expected {config.layers} maps of each direction, "
                             f"got {len(maps_prev)} and {len(maps_next)}")
        expected = (batch, config.frames - 1, patches, patches)
        for maps in (*maps_prev, *maps_next):
            if tuple(maps.shape) != expected:
                raise ValueError(f"attention maps of shape {tuple(maps.shape)}, expected {list(expected)}")


class EVLModel(nn.Module):
    """EVL decoder plus classification head: logits = Linear(Dropout(LayerNorm(x))) (section 4)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.proj = nn.Sequential(
            LayerNorm(config.width),
            nn.Dropout(config.head_dropout),
            nn.Linear(config.width, config.num_classes),
        )

    def forward(self, block_outputs: list[Tensor], maps_prev: list[Tensor] | None = None,
                maps_next: list[Tensor] | None = None) -> Tensor:
        """Class logits [B, num_classes].

        block_outputs: N tensors [B, T, L, C], the last N cached blocks, shallowest first; any float
        dtype, computed in float32 (or under autocast).
        maps_prev[i]: [B, T-1, P, P], maps_prev[i][:, t-1] is A_prev[t] (t = 1..T-1).
        maps_next[i]: [B, T-1, P, P], maps_next[i][:, t] is A_next[t] (t = 0..T-2).
        The maps may be None when temporal cross-attention is off. T must equal config.frames.
        """
        return self.proj(self.features(block_outputs, maps_prev, maps_next))

    def features(self, block_outputs: list[Tensor], maps_prev: list[Tensor] | None = None,
                 maps_next: list[Tensor] | None = None) -> Tensor:
        """The decoder output x [B, C] before the head (for other heads, e.g. CLIP text)."""
        return self.decoder(block_outputs, maps_prev, maps_next)


class TextHeadModel(nn.Module):
    """ViFi-CLIP's text side alone, from the cache (`--head text`): no decoder, the image side frozen.

    The video embedding is the per-frame CLIP embeddings [B, T, E] averaged over frames and
    L2-normalised; `text` gives the L2-normalised class embeddings [K, E] (learned prompts, a tuned
    text tower, or both) and the model's own logits: exp(logit_scale) * cosine similarity, plus the logit
    bias of a model that has one (SigLIP's; it moves every class alike, so softmax scores do not change).
    """

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text

    @property
    def rebuilt_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes left out of saved weights: the frozen text tower, rebuilt from the backbone."""
        return () if self.text.tune_tower else ("text.tower.",)

    def forward(self, embeddings: Tensor) -> Tensor:
        """Class logits [B, K] of cached per-frame embeddings [B, T, E] (any float dtype)."""
        video = F.normalize(embeddings.float().mean(1), dim=-1)
        return self.text.tower.logits(video @ self.text().t())


class ClipTextModel(nn.Module):
    """EVL's decoder with a CLIP-text head (`--head clip-text`): open-vocabulary video recognition.

    The decoder output x goes through LayerNorm, dropout and a Linear(C, E) into CLIP's joint space,
    is L2-normalised, and is scored against the class embeddings of `text` with the model's own logits
    (`TextTower.logits`). The classes are names, not rows of a weight matrix, so the trained
    model scores any class list (`text.set_classes`).
    """

    def __init__(self, config: DecoderConfig, embed_dim: int, text: nn.Module):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.proj = nn.Sequential(
            LayerNorm(config.width),
            nn.Dropout(config.head_dropout),
            nn.Linear(config.width, embed_dim),
        )
        self.text = text

    @property
    def rebuilt_prefixes(self) -> tuple[str, ...]:
        return () if self.text.tune_tower else ("text.tower.",)

    def forward(self, block_outputs: list[Tensor], maps_prev: list[Tensor] | None = None,
                maps_next: list[Tensor] | None = None) -> Tensor:
        """Class logits [B, K]; arguments as in `EVLModel.forward`."""
        video = F.normalize(self.proj(self.decoder(block_outputs, maps_prev, maps_next)).float(), dim=-1)
        return self.text.tower.logits(video @ self.text().t())
