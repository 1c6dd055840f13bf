"""Memory planner: per-card GPU memory of a Llama split over N tensor-parallel cards.

The weights, KV-cache and training-state figures are exact for this project's model (the tests
compare them with real shards, caches, adapters and optimizer shards); activations are estimates
from what the forward pass keeps alive (tested against autograd's saved tensors). Symbols: b
bytes per element of --dtype, N cards, B batch, S sequence length (soft prompt included),
T = B*S tokens, L layers, d dim, H heads, K kv heads, h head dim, F SwiGLU hidden size, V vocab,
r LoRA rank, P parameters per card, D data-parallel ranks. The formulas are repeated in README.md.

Modes: infer (KV cache), prompt-tune and lora (frozen base in b bytes; a soft prompt or float32
adapters with float32 gradients and AdamW moments), full (float32 master weights, gradients,
and AdamW moments sharded over D by ZeRO; activations in b, optionally checkpointed per block).
"""

from dataclasses import dataclass
from typing import Literal

from llama.files import GiB
from llama.formats.layout import full_shapes, lora_split_dims, split_dim, split_sizes
from llama.lora import DEFAULT_TARGETS, TARGETS
from llama.model import ModelArgs

Mode = Literal["infer", "prompt-tune", "lora", "full"]
MODES = ("infer", "prompt-tune", "lora", "full")
LORA_TARGETS = DEFAULT_TARGETS  # ft_main.py's default --lora_targets
CARD_COUNTS = (1, 2, 4, 8)


@dataclass
class CardMemory:
    """Bytes one of N cards needs; `shardable` is False when N does not divide the split dims."""

    cards: int
    shardable: bool
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    train_state: int = 0
    """Gradients and optimizer states of what trains (plus one gradient all-reduce bucket)."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.train_state + self.activations + self.overhead


def weight_bytes(args: ModelArgs, cards: int, dtype_bytes: int, quantize=None) -> int:
    """b * (split weights / N + replicated norms), from the same table the loader uses.

    `quantize` (a --quantize value): the seven block linears take what the loader holds for each
    card's slice (llama.quantize.weight_nbytes: codes, scales, padding), the rest b bytes each.
    """
    from llama import quantize as quant

    scheme = quant.parse_scheme(quantize)
    total = 0
    for key, shape in full_shapes(args).items():
        if quant.applies(scheme, key):
            out_features, in_features = shape
            local = (out_features // cards, in_features) if split_dim(key) == 0 else (out_features, in_features // cards)
            total += quant.weight_nbytes(scheme, *local, dtype_bytes)
            continue
        numel = 1
        for size in shape:
            numel *= size
        total += (numel // cards if split_dim(key) is not None else numel) * dtype_bytes
    return total


def kv_cache_bytes(args: ModelArgs, cards: int, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """2 (k and v) * L * B * S * (K/N) * h * b: the preallocated cache of every layer."""
    return 2 * args.n_layers * batch * seq_len * (args.kv_heads // cards) * args.head_dim * dtype_bytes


def layer_transient_bytes(args: ModelArgs, cards: int, tokens: int, dtype_bytes: int) -> int:
    """Largest working set inside one layer: T * (2*d*b + max(3*F*b, (H+2K)*h*b + 3*H*h*4) / N).

    The residual stream and its normed copy are full width on every card; on top of that either
    the feed-forward's three [T, F/N] tensors (w1 x, silu, w3 x) or q, k, v with RoPE's float32
    working copies of q are alive.
    """
    ffn = 3 * args.hidden_dim * dtype_bytes
    attention = (args.n_heads + 2 * args.kv_heads) * args.head_dim * dtype_bytes + 3 * args.n_heads * args.head_dim * 4
    return tokens * (2 * args.dim * dtype_bytes + max(ffn, attention) // cards)


def saved_for_backward_bytes(args: ModelArgs, cards: int, tokens: int, dtype_bytes: int) -> int:
    """L * T * (8*d + (2*(H+K)*h + 3*F) * b / N) + T*d*4: what autograd keeps for the backward.

    With frozen weights the linear layers keep no inputs. Per layer and token each RMSNorm keeps
    its float32 input (4*d bytes, on every card), attention keeps q, k, v and its output, and the
    SwiGLU keeps w1 x, silu(w1 x) and w3 x; the final norm keeps its float32 input.
    """
    per_token = 8 * args.dim + (2 * (args.n_heads + args.kv_heads) * args.head_dim + 3 * args.hidden_dim) * dtype_bytes // cards
    return args.n_layers * tokens * per_token + tokens * args.dim * 4


def lora_parameter_count(args: ModelArgs, cards: int, rank: int, targets=LORA_TARGETS) -> int:
    """LoRA numbers on one card: r*(in + out) per adapted layer, the split factor divided by N.

    A column-parallel layer keeps A [r, in] whole and B [out/N, r]; a row-parallel one A [r, in/N]
    and B [out, r] whole (llama/lora.py; the split dims come from SPLIT_DIMS).
    """
    total = 0
    for key, shape in full_shapes(args).items():
        if not any(key.endswith(f"{TARGETS[t] or 'output'}.weight") for t in targets):
            continue
        out_features, in_features = shape
        a_dim, b_dim = lora_split_dims(key)
        total += rank * (in_features // (cards if a_dim is not None else 1) + out_features // (cards if b_dim is not None else 1))
    return total


def lora_saved_bytes(args: ModelArgs, cards: int, tokens: int, dtype_bytes: int, rank: int, targets=LORA_TARGETS) -> int:
    """L * T * (4*r per adapter + float32 inputs of the adapters): what the adapters add to autograd's store.

    Each adapter keeps its float32 input x (for A's gradient) and h = A x [T, r] (for B's). In
    float32 the adapters of wq/wk/wv share one input (the normed x), as do w1/w3; in 16 bits
    each adapter casts its own float32 copy. Inputs: d for wq..wv and w1, w3; H*h/N for wo, F/N for w2.
    """
    widths = {"wq": args.dim, "wk": args.dim, "wv": args.dim, "wo": args.n_heads * args.head_dim // cards,
              "w1": args.dim, "w3": args.dim, "w2": args.hidden_dim // cards}
    shared = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "wo", "w1": "ffn", "w3": "ffn", "w2": "w2"}
    block = [t for t in targets if t != "output"]
    inputs = {shared[t]: widths[t] for t in block} if dtype_bytes == 4 else {t: widths[t] for t in block}
    per_token = 4 * (rank * len(block) + sum(inputs.values()))
    return args.n_layers * tokens * per_token


def full_saved_bytes(args: ModelArgs, cards: int, tokens: int, dtype_bytes: int) -> int:
    """L * T * (4*d + (H*h + F)/N) * b + 2*T*d*b: what trainable weights add to autograd's store.

    Every linear keeps its input (the two normed x's, attention's output for wo, the SwiGLU
    product for w2) and every RMSNorm its normalised x (for its weight's gradient).
    """
    per_token = (4 * args.dim + (args.n_heads * args.head_dim + args.hidden_dim) // cards) * dtype_bytes
    return args.n_layers * tokens * per_token + 2 * tokens * args.dim * dtype_bytes


def activation_bytes(args: ModelArgs, cards: int, batch: int, seq_len: int, dtype_bytes: int, mode: Mode,
                     lora_rank: int = 8, lora_targets=LORA_TARGETS, checkpoint_activations: bool = False) -> int:
    """infer: prefill of the whole batch (one layer's working set) + last-position logits B*V*(b+4).

    Training: saved-for-backward + one layer's working set + logits T*V*(b+8) (gathered on every
    card, their float32 copy and log-softmax; ft_main's chunked loss keeps far less). lora adds
    the adapters' saved inputs, full the weights' inputs; with checkpoint_activations full keeps
    only each block's input (L*T*d*b) plus one block's saved tensors while it is recomputed.
    Attention is assumed fused (no S x S matrix).
    """
    tokens = batch * seq_len
    working = layer_transient_bytes(args, cards, tokens, dtype_bytes)
    if mode == "infer":
        return working + batch * args.vocab_size * (dtype_bytes + 4)
    saved = saved_for_backward_bytes(args, cards, tokens, dtype_bytes)
    if mode == "lora":
        saved += lora_saved_bytes(args, cards, tokens, dtype_bytes, lora_rank, lora_targets)
    elif mode == "full":
        saved += full_saved_bytes(args, cards, tokens, dtype_bytes)
        if checkpoint_activations:
            saved = args.n_layers * tokens * args.dim * dtype_bytes + saved // args.n_layers
    return saved + working + tokens * args.vocab_size * (dtype_bytes + 8)


def train_state_bytes(args: ModelArgs, cards: int, mode: Mode, data_parallel: int = 1, lora_rank: int = 8, lora_targets=LORA_TARGETS) -> int:
    """lora: 12 bytes per adapter number (float32 gradient + AdamW's two moments).

    full: P float32 gradients + 8P/D AdamW moments (ZeRO shards them over the D data-parallel
    ranks) + one 2^25-element float32 bucket of the data-parallel gradient all-reduce when D > 1.
    """
    if mode == "lora":
        return 12 * lora_parameter_count(args, cards, lora_rank, lora_targets)
    if mode != "full":
        return 0
    params = weight_bytes(args, cards, 1)
    bucket = 4 * min(params, 2**25) if data_parallel > 1 else 0
    return 4 * params + 8 * params // data_parallel + bucket


def estimate(args: ModelArgs, cards: int, batch: int, seq_len: int, dtype_bytes: int, mode: Mode, overhead: int,
             data_parallel: int = 1, lora_rank: int = 8, lora_targets=LORA_TARGETS, checkpoint_activations: bool = False,
             quantize=None) -> CardMemory:
    """Per-card memory on `cards` cards; the KV cache is only allocated for inference.

    Weights are b bytes each, except full fine-tuning's float32 master weights and the block
    linears under `quantize` (QLoRA: --mode lora with nf4); lora adds its float32 adapters to the
    frozen weights.
    """
    weights = weight_bytes(args, cards, 4 if mode == "full" else dtype_bytes, quantize)
    if mode == "lora":
        weights += 4 * lora_parameter_count(args, cards, lora_rank, lora_targets)
    return CardMemory(
        cards=cards,
        shardable=all(size % cards == 0 for size in split_sizes(args).values()),
        weights=weights,
        kv_cache=kv_cache_bytes(args, cards, batch, seq_len, dtype_bytes) if mode == "infer" else 0,
        activations=activation_bytes(args, cards, batch, seq_len, dtype_bytes, mode, lora_rank, lora_targets, checkpoint_activations),
        overhead=overhead,
        train_state=train_state_bytes(args, cards, mode, data_parallel, lora_rank, lora_targets),
    )


def parameter_count(args: ModelArgs) -> int:
    return weight_bytes(args, 1, 1)


def format_plan(args: ModelArgs, rows: list[CardMemory], gpu_mem: int, header: str) -> str:
    """A table in GiB per card and the verdict: the smallest shardable N that fits."""
    lines = [
        header,
        f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, {args.kv_heads} kv heads, "
        f"hidden {args.hidden_dim}, vocab {args.vocab_size}: {parameter_count(args) / 1e9:.2f} B parameters",
        f"{'N':>3} {'weights':>9} {'kv_cache':>9} {'grad+opt':>9} {'activ.':>9} {'overhead':>9} {'total':>9}  per card (GiB)",
    ]
    for row in rows:
        figures = (row.weights, row.kv_cache, row.train_state, row.activations, row.overhead, row.total)
        verdict = "split dims do not divide" if not row.shardable else ("fits" if row.total <= gpu_mem else "too big")
        lines.append(f"{row.cards:>3} " + " ".join(f"{x / GiB:>9.2f}" for x in figures) + f"  {verdict}")
    fitting = [row.cards for row in rows if row.shardable and row.total <= gpu_mem]
    if fitting:
        lines.append(f"smallest N that fits {gpu_mem / GiB:.1f} GiB cards: {fitting[0]}")
    else:
        lines.append(f"no N in {CARD_COUNTS} fits {gpu_mem / GiB:.1f} GiB cards: lower --batch_size or --seq_len")
    return "\n".join(lines)
