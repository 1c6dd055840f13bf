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
from typing import Literal, Optional

from llama.files import GiB
from llama.formats.layout import full_shapes, lora_split_dims, meta_model, split_dim, split_sizes
from llama.formats.load import quantize_targets
from llama.kernels.schemes import Scheme, weight_nbytes
from llama.lora import DEFAULT_TARGETS, TARGETS
from llama.model import ModelArgs

Mode = Literal["infer", "prompt-tune", "lora", "full"]
MODES = ("infer", "prompt-tune", "lora", "full")
LORA_TARGETS = DEFAULT_TARGETS  # ft_main.py's default --lora_targets
CARD_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Workload:
    """What the cards will run: split_model.py --plan's options (and a tuning run's own, for its warning)."""

    mode: Mode = "infer"
    batch: int = 8
    seq_len: int = 512
    """Tokens per sequence, soft prompt included."""
    dtype_bytes: int = 2
    """b: bytes per element of the runtime dtype."""
    data_parallel: int = 1
    """full: data-parallel ranks sharing the AdamW states (ZeRO)."""
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    checkpoint_activations: bool = False
    """lora, full: keep only each block's input and recompute the block in backward."""
    quantize: Optional[Scheme] = None
    """The weight-only quantization of the block linears and the head as the loader applies it
    (`load.quantize_targets`; QLoRA: lora with nf4)."""
    objective: str = "sft"
    """dpo: `batch` counts preference pairs, each two sequences (chosen and rejected) in one forward. The
    reference costs no memory of its own: LoRA and prompt run the same model without what trains, under
    no_grad (a working set no larger than the policy's); full reads log-probs computed before training."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len * (2 if self.objective == "dpo" else 1)


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


def weight_bytes(args: ModelArgs, cards: int, dtype_bytes: int, quantize: Optional[Scheme] = None) -> int:
    """b * (split weights / N + replicated norms), from the same table the loader uses.

    `quantize`: the linears the loader quantizes (`quantize_targets`: the block linears in `quantize`,
    the output head in its own scheme) take what it holds for each card's slice
    (llama.kernels.schemes.weight_nbytes: codes, scales, padding), the rest b bytes each. (On a CPU
    the int8 kernel is fbgemm's, which pads in-features to 512: `FbgemmInt8Linear.nbytes`; a CPU
    inference load's float32 linears pre-packed by oneDNN hold the same bytes, by MKL twice them, the
    weight kept beside its packed copy: `PackedLinear`, README "Threads".)
    """
    quantized = quantize_targets(meta_model(args), quantize)
    total = 0
    for key, shape in full_shapes(args).items():
        dim = split_dim(key)
        if key in quantized:
            out_features, in_features = shape
            local = (out_features // cards, in_features) if dim == 0 else (out_features, in_features // cards)
            total += weight_nbytes(quantized[key], *local, dtype_bytes)
            continue
        numel = 1
        for size in shape:
            numel *= size
        total += (numel // cards if dim is not None else numel) * dtype_bytes
    return total


def kv_cache_bytes(args: ModelArgs, cards: int, *, batch: int, seq_len: int, dtype_bytes: int) -> int:
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


def lora_parameter_count(args: ModelArgs, cards: int, r: int, targets=LORA_TARGETS) -> int:
    """LoRA numbers on one card: r*(in + out) per adapted layer, the split factor divided by N.

    A column-parallel layer keeps A [r, in] whole and B [out/N, r]; a row-parallel one A [r, in/N]
    and B [out, r] whole (llama/lora.py; the split dims follow the base weights').
    """
    total = 0
    for key, shape in full_shapes(args).items():
        if not any(key.endswith(f"{TARGETS[t] or 'output'}.weight") for t in targets):
            continue
        out_features, in_features = shape
        a_dim, b_dim = lora_split_dims(key)
        total += r * (in_features // (cards if a_dim is not None else 1) + out_features // (cards if b_dim is not None else 1))
    return total


def lora_saved_bytes(args: ModelArgs, cards: int, *, tokens: int, dtype_bytes: int, r: int, targets=LORA_TARGETS) -> int:
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
    per_token = 4 * (r * len(block) + sum(inputs.values()))
    return args.n_layers * tokens * per_token


def full_saved_bytes(args: ModelArgs, cards: int, tokens: int, dtype_bytes: int) -> int:
    """L * T * (4*d + (H*h + F)/N) * b + 2*T*d*b: what trainable weights add to autograd's store.

    Every linear keeps its input (the two normed x's, attention's output for wo, the SwiGLU
    product for w2) and every RMSNorm its normalised x (for its weight's gradient).
    """
    per_token = (4 * args.dim + (args.n_heads * args.head_dim + args.hidden_dim) // cards) * dtype_bytes
    return args.n_layers * tokens * per_token + 2 * tokens * args.dim * dtype_bytes


def activation_bytes(args: ModelArgs, cards: int, work: Workload) -> int:
    """infer: prefill of the whole batch (one layer's working set) + last-position logits B*V*(b+4).

    Training: saved-for-backward + one layer's working set + logits T*V*(b+8) (gathered on every
    card, their float32 copy and log-softmax; ft_main's chunked loss keeps far less). lora adds
    the adapters' saved inputs, full the weights' inputs; with checkpoint_activations (lora, full)
    the forward keeps only each block's input (L*T*d*b) plus, while one block is recomputed, that
    block's saved tensors. Attention is assumed fused (no S x S matrix).
    """
    tokens, b = work.tokens, work.dtype_bytes
    working = layer_transient_bytes(args, cards, tokens, b)
    if work.mode == "infer":
        return working + work.batch * args.vocab_size * (b + 4)
    saved = saved_for_backward_bytes(args, cards, tokens, b)
    if work.mode == "lora":
        saved += lora_saved_bytes(args, cards, tokens=tokens, dtype_bytes=b, r=work.lora_rank, targets=work.lora_targets)
    elif work.mode == "full":
        saved += full_saved_bytes(args, cards, tokens, b)
    if work.checkpoint_activations and work.mode in ("lora", "full"):
        saved = args.n_layers * tokens * args.dim * b + saved // args.n_layers
    return saved + working + tokens * args.vocab_size * (b + 8)


def train_state_bytes(args: ModelArgs, cards: int, work: Workload) -> int:
    """lora: 12 bytes per adapter number (float32 gradient + AdamW's two moments).

    full: P float32 gradients + 8P/D AdamW moments (ZeRO shards them over the D data-parallel
    ranks) + one 2^25-element float32 bucket of the data-parallel gradient all-reduce when D > 1.
    """
    if work.mode == "lora":
        return 12 * lora_parameter_count(args, cards, work.lora_rank, work.lora_targets)
    if work.mode != "full":
        return 0
    params = weight_bytes(args, cards, 1)
    bucket = 4 * min(params, 2**25) if work.data_parallel > 1 else 0
    return 4 * params + 8 * params // work.data_parallel + bucket


def estimate(args: ModelArgs, cards: int, work: Workload, *, overhead: int) -> CardMemory:
    """Per-card memory on `cards` cards; the KV cache is only allocated for inference.

    Weights are b bytes each, except full fine-tuning's float32 master weights and the block
    linears under `work.quantize` (QLoRA: lora with nf4); lora adds its float32 adapters to the
    frozen weights.
    """
    weights = weight_bytes(args, cards, 4 if work.mode == "full" else work.dtype_bytes, work.quantize)
    if work.mode == "lora":
        weights += 4 * lora_parameter_count(args, cards, work.lora_rank, work.lora_targets)
    return CardMemory(
        cards=cards,
        shardable=all(size % cards == 0 for size in split_sizes(args).values()),
        weights=weights,
        kv_cache=kv_cache_bytes(args, cards, batch=work.batch, seq_len=work.seq_len, dtype_bytes=work.dtype_bytes) if work.mode == "infer" else 0,
        activations=activation_bytes(args, cards, work),
        overhead=overhead,
        train_state=train_state_bytes(args, cards, work),
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
