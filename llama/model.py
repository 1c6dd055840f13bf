"""The Llama 1/2/3 transformer with fairscale tensor parallelism.

Read top to bottom in dependency order, like Meta's reference: ModelArgs -> RMSNorm -> RoPE ->
KVCache -> Attention -> FeedForward -> TransformerBlock -> Transformer. Module names are the
checkpoint keys of Meta's `consolidated.NN.pth` files, so a shard loads with `load_state_dict`.

Tensor parallelism is visible in the constructors (the layers live in llama/parallel.py, each
stating the dim it splits): column-parallel layers (wq, wk, wv, w1, w3, output) keep a slice of
the output features, row-parallel layers (wo, w2) a slice of the input features and all-reduce
their result, and the embedding keeps a slice of the embedding dim (Llama 1/2, ParallelEmbedding)
or of the vocabulary (Llama 3, VocabParallelEmbedding). Each of the `tp` ranks therefore owns
n_heads / tp query heads and n_kv_heads / tp key/value heads.

Generation keeps keys and values in a KV cache per layer with `max_batch_size` rows; a forward
says where its batch goes in it with a `CacheSpan` (which rows, from which position, or one
position per row), so requests of different lengths share the cache (llama/engine.py).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama.parallel import ColumnParallelLinear, FusedColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding


@dataclass
class ModelArgs:
    """Shape of a Llama model; the fields are the keys of Meta's `params.json`."""

    dim: int = 4096
    """Width of the residual stream."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Query heads (head_dim = dim / n_heads)."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; None means n_heads (Llama 1, Llama 2 7B/13B)."""
    vocab_size: int = -1
    """Vocabulary size; -1 in Meta's files means "take it from the tokenizer"."""
    multiple_of: int = 256
    """The SwiGLU hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: Optional[float] = None
    """Extra scale on the SwiGLU hidden size (Llama 2 70B uses 1.3)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm (Llama 1 files say 1e-6)."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies (Llama 3: 500000)."""
    use_scaled_rope: bool = False
    """Llama 3.1+: stretch the low rotary frequencies for long context (Meta's `apply_scaling`)."""
    rope_scaling: Optional[dict] = None
    """Constants of that stretch, as HF's `rope_scaling` names them: factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings. None means Meta's (8, 1, 4, 8192); HF's
    Llama 3.2 configs say factor 32, so a checkpoint that states its constants keeps them."""
    vocab_parallel_embedding: bool = False
    """Split the embedding on the vocabulary (Meta's Llama 3 code) instead of on dim (Llama 1/2).
    Not a params.json key: the checkpoint reader decides it from the files."""
    max_batch_size: int = 32
    """Rows the KV cache is allocated for."""
    max_seq_len: int = 2048
    """Positions the KV cache and the RoPE tables are allocated for."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Meta's SwiGLU rule: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the model dtype (as Meta does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one op instead of six, and on CPU the same float32 arithmetic as below, bit for bit (test_model.py)
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        x32 = x.float()  # 16-bit: Meta rounds the normed value to x's dtype before the weight multiplies it
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


META_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def scale_rope_freqs(freqs: torch.Tensor, *, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_position_embeddings: int) -> torch.Tensor:
    """Meta's Llama 3.1 `apply_scaling`: wavelengths longer than the original context / low are
    divided by `factor`, those shorter than context / high are kept, and the band between is
    interpolated smoothly, so long-range positions stay within what the model was trained on."""
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def precompute_rope(head_dim: int, end: int, *, theta: float, device=None, scaling: Optional[dict] = None) -> torch.Tensor:
    """The rotation of every position, [end, head_dim // 2, 2, 2], computed once: for pair i at position
    m, with a = m * theta^(-2i/head_dim), the rows (cos a, cos a) and (-sin a, sin a).

    Meta rotates each consecutive pair (x[2i], x[2i+1]) as the complex number x[2i] + j*x[2i+1]
    multiplied by exp(j a). Keeping cos and sin as real tables gives bit-for-bit the same arithmetic
    in every dtype and compiles without complex-number support; laying them out per pair as above lets
    `apply_rope` rotate with two products and a sum. `scaling` (Llama 3.1+) rescales the frequencies
    first, see `scale_rope_freqs`.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        freqs = scale_rope_freqs(freqs, **scaling)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.stack([cos, cos], dim=-1), torch.stack([-sin, sin], dim=-1)], dim=-2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of x [B, T, H, D] by the rotations in rope [T, D/2, 2, 2] (`precompute_rope`), or
    [B, T, D/2, 2, 2] when each row sits at its own positions (a server's batch); float32 arithmetic.

    (x0, x1) -> (x0, x1) * (cos, cos) + (x1, x0) * (-sin, sin) = (x0 cos - x1 sin, x1 cos + x0 sin):
    the products and sums of Meta's complex rotation, rounded alike (x1 * -sin is -(x1 sin) exactly),
    in four ops on the whole tensor instead of seven.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    rope = rope.view(-1, pairs.size(1), 1, pairs.size(3), 2, 2)
    return (pairs * rope[..., 0, :] + pairs.flip(-1) * rope[..., 1, :]).flatten(3).type_as(x)


class CacheSpan(NamedTuple):
    """Where a forward's keys and values go in the KV caches, and which cached ones it attends to.

    Batch row b is cache row `rows.start + b`. `start` is an int when every row of the batch sits
    at the same positions start..start+T-1 (a prompt, or rows decoding in step), or a [B] tensor of
    positions with T = 1 (each row decodes at its own position: requests that joined at different
    times). `length` bounds the cached positions attended to (None: all of them, every step the same
    shape, which torch.compile and CUDA graphs want); later positions are masked.
    """

    rows: slice
    start: int | torch.Tensor
    length: Optional[int] = None


class KVCache(nn.Module):
    """Preallocated keys/values [rows, kv_heads, max_seq_len, head_dim], written in place."""

    def __init__(self, rows: int, kv_heads: int, seq_len: int, head_dim: int, *, dtype, device):
        super().__init__()
        shape = (rows, kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, span: CacheSpan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] where `span` says; return the keys/values to attend over
        (views of the cache rows: positions 0..end for an int start, else `span.length` or all)."""
        k_rows, v_rows = self.k[span.rows], self.v[span.rows]
        if isinstance(span.start, torch.Tensor):
            batch = torch.arange(k.size(0), device=k.device)
            k_rows[batch, :, span.start] = k[:, :, 0]  # advanced indices around a slice: [B, H, D]
            v_rows[batch, :, span.start] = v[:, :, 0]
            end = span.length or self.k.size(2)
        else:
            end = span.start + k.size(2)
            k_rows[:, :, span.start : end] = k
            v_rows[:, :, span.start : end] = v
        return k_rows[:, :, :end], v_rows[:, :, :end]


def causal_mask(n_queries: int, n_keys: int, device) -> Optional[torch.Tensor]:
    """Boolean mask letting query i (at position n_keys - n_queries + i) see keys 0..its position.

    With a cache the queries are the last n_queries of n_keys positions, so a prompt fed in
    chunks (start > 0) still sees everything before it. One query needs no mask.
    """
    if n_queries == 1:
        return None
    offset = n_keys - n_queries
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=offset)


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads; wo all-reduces the partial outputs."""

    FUSED = {"wqkv": ("wq", "wk", "wv")}
    """Layers reading the same input that inference may run as one product (llama.formats.load, inference=True)."""
    cache: Optional[KVCache]
    """Keys/values of earlier positions (generation), or None (training, scoring)."""
    wqkv: Optional[FusedColumnParallelLinear]
    """wq|wk|wv as one product (inference), or None: three."""

    def __init__(self, args: ModelArgs, tp: int = 1):
        super().__init__()
        self.n_local_heads = args.n_heads // tp
        self.n_local_kv_heads = args.kv_heads // tp
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, tp)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, tp)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, tp)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, tp)
        self.cache = None
        self.wqkv = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor] = None, span: Optional[CacheSpan] = None) -> torch.Tensor:
        """x [B, T, dim]; mask None means causal (over the cache with a span); without a span
        nothing is cached and the batch attends to itself."""
        batch, seq_len, _ = x.shape
        q, k, v = (self.wq(x), self.wk(x), self.wv(x)) if self.wqkv is None else self.wqkv(x, (self.wq, self.wk, self.wv))
        q = q.view(batch, seq_len, self.n_local_heads, self.head_dim)
        k = k.view(batch, seq_len, self.n_local_kv_heads, self.head_dim)
        v = v.view(batch, seq_len, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if span is not None:
            k, v = self.cache.update(span, k, v)
        if mask is None:
            mask = causal_mask(seq_len, k.size(2), x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_local_heads != self.n_local_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1/w3 split the hidden features, w2 all-reduces."""

    FUSED = {"w13": ("w1", "w3")}
    w13: Optional[FusedColumnParallelLinear]
    """w1|w3 as one product (inference), or None: two."""

    def __init__(self, dim: int, hidden_dim: int, tp: int = 1):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, tp)
        self.w2 = RowParallelLinear(hidden_dim, dim, tp)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, tp)
        self.w13 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.w1(x), self.w3(x)) if self.w13 is None else self.w13(x, (self.w1, self.w3))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(.))."""

    def __init__(self, args: ModelArgs, tp: int = 1):
        super().__init__()
        self.attention = Attention(args, tp)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, tp)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor] = None, span: Optional[CacheSpan] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, span)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids -> float32 logits for every position, on one of `tp` tensor-parallel ranks.

    Build it (on the meta device: llama.formats.load.load_model gives each rank its slices), then
    call `setup_caches`, which allocates the RoPE table and, for generation, the KV caches on the
    weights' device and dtype.
    """

    rope: Optional[torch.Tensor]
    """The rotation of every position (`precompute_rope`), made by `setup_caches`."""
    activation_checkpointing: bool
    """Training: keep only each block's input and recompute the block in backward."""
    quantization: Optional[str]
    """The --quantize scheme the linears were quantized with while loading (llama/kernels; the output
    head's own is `schemes.head_scheme` of it), or None."""

    def __init__(self, args: ModelArgs, tp: int = 1):
        super().__init__()
        self.args = args
        embedding = VocabParallelEmbedding if args.vocab_parallel_embedding else ParallelEmbedding
        self.tok_embeddings = embedding(args.vocab_size, args.dim, tp)
        self.layers = nn.ModuleList(TransformerBlock(args, tp) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, tp, gather_output=True)
        self.rope = None
        self.activation_checkpointing = False
        self.quantization = None

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the RoPE table for max_seq_len positions and, with max_batch_size rows (0: none,
        as training needs), per-layer KV caches. Calling it again resizes."""
        weight = self.tok_embeddings.weight
        scaling = (self.args.rope_scaling or META_ROPE_SCALING) if self.args.use_scaled_rope else None
        self.rope = precompute_rope(self.args.head_dim, max_seq_len, theta=self.args.rope_theta, device=weight.device, scaling=scaling)
        for layer in self.layers:
            attn = layer.attention
            shape = (max_batch_size, attn.n_local_kv_heads, max_seq_len, attn.head_dim)
            attn.cache = KVCache(*shape, dtype=weight.dtype, device=weight.device) if max_batch_size else None

    @property
    def max_seq_len(self) -> int:
        return 0 if self.rope is None else self.rope.size(0)

    @property
    def cache_rows(self) -> int:
        """Sequences the KV caches hold (0 without caches): the most a batch decodes at once."""
        cache = self.layers[0].attention.cache if len(self.layers) else None
        return 0 if cache is None else cache.k.size(0)

    def hidden_states(
        self, tokens: torch.Tensor, span: Optional[CacheSpan] = None, *, prefix: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, dim] of the token positions.

        `span` puts the keys/values into the KV caches (see `CacheSpan`); without one, the batch
        sits at positions 0..T-1 and nothing is cached. `prefix` [B, P, dim] (a soft prompt) goes
        before the tokens' embeddings at the first P positions; its own outputs are dropped.

        Packed training rows (llama/tuning/packing.py) hold several examples each: `positions` [B, T]
        gives every slot its RoPE position (restarting at 0 for each example), `mask`
        [B, 1, T, T] lets a slot attend only within its example, and `embeds` [B, T, dim], if
        given, replaces the token lookup (prompt tuning puts each example's soft prompt there).
        """
        h = self.tok_embeddings(tokens) if embeds is None else embeds
        n_prefix = 0
        if prefix is not None:
            n_prefix = prefix.size(1)
            h = torch.cat([prefix.to(h.dtype), h], dim=1)
        if self.rope is None:
            raise ValueError("call model.setup_caches() before the first forward")
        rope, mask = self._positions(h.size(1), span, positions, mask)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, mask, span, use_reentrant=False)
            else:
                h = layer(h, rope, mask, span)
        return self.norm(h[:, n_prefix:])

    def _positions(self, seq_len: int, span: Optional[CacheSpan], positions: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """RoPE angles of the batch's positions, and the attention mask (None: causal)."""
        if positions is not None:
            return self.rope[positions], mask
        if span is None or not isinstance(span.start, torch.Tensor):
            start = 0 if span is None else span.start
            if start + seq_len > self.max_seq_len:
                raise ValueError(f"positions up to {start + seq_len} exceed max_seq_len {self.max_seq_len}")
            return self.rope[start : start + seq_len], mask
        # one token per row, each at its own position: a row sees the cached keys up to its position
        pos = span.start
        keys = torch.arange(span.length or self.max_seq_len, device=pos.device)
        return self.rope[pos], (keys <= pos.view(-1, 1)).view(pos.size(0), 1, 1, -1)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, vocab] in float32 for every token position (gathered over TP ranks), as
        Meta's forward: with KV caches the batch takes cache rows 0..B-1 from `start_pos`."""
        span = CacheSpan(slice(0, tokens.size(0)), start_pos) if self.cache_rows else None
        if span is None and start_pos:
            raise ValueError("start_pos > 0 needs a KV cache: call model.setup_caches() with rows first")
        return self.output(self.hidden_states(tokens, span, prefix=prefix)).float()
