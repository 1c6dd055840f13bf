"""llama/model.py against independent references: Meta's complex-number RoPE, a float64
re-implementation of Meta's forward (repeat_kv + explicit softmax), the KV cache against full
forwards, and GQA against the same model with its key/value heads repeated.

Models: the bundled stories260K and a random Llama-2-style config (GQA 8:2, ffn_dim_multiplier,
rope_theta 500000, norm_eps 1e-6). Every test runs on CPU and, when available, CUDA (float32).
"""

import pytest
import torch
import torch.nn.functional as F
from references import DEVICES, STORIES

from llama.errors import UserError
from llama.formats import layout, params
from llama.model import CacheSpan, ModelArgs, RMSNorm, Transformer, apply_rope, precompute_rope

LLAMA2_STYLE = ModelArgs(
    dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=64,
    ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=500000.0, max_batch_size=4, max_seq_len=64,
)
STORIES_ARGS = params.model_args(params.read_params(STORIES / "params.json"), 512, max_batch_size=4, max_seq_len=64)
# float32 logits (|logit| up to ~19, where one float32 ulp is 2e-6) vs the float64 reference
# (measured 1.0e-5), and vs float32 by another summation order: cache, chunks (measured 1.05e-5).
REF_ATOL = 1e-4
SAME_ATOL = 2e-5


def model_and_state(name: str) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    if name == "stories260K":
        return STORIES_ARGS, torch.load(STORIES / "consolidated.00.pth", weights_only=True, mmap=True)
    return LLAMA2_STYLE, layout.random_state_dict(LLAMA2_STYLE, seed=0)


def build(args: ModelArgs, state: dict, device: str, kv_cache: bool = True) -> Transformer:
    """A one-rank model holding `state`: its structure on the meta device, then the weights assigned."""
    with torch.device("meta"):
        model = Transformer(args)
    weights = {k: v.to(device) for k, v in state.items() if k not in layout.NOT_LOADED}
    model.load_state_dict(weights, strict=True, assign=True)
    model.setup_caches(args.max_batch_size if kv_cache else 0, args.max_seq_len)
    return model.eval()


def random_tokens(args: ModelArgs, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- Meta's reference arithmetic (meta-llama/llama model.py), written independently -------------

def meta_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def meta_apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D], freqs_cis [T, D/2] complex."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(x_ * freqs_cis.view(1, x_.size(1), 1, x_.size(3))).flatten(3)
    return out.type_as(x)


def meta_reference_logits(args: ModelArgs, state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's forward in float64: RMSNorm, complex RoPE, repeat_kv, softmax(QK^T/sqrt(d) + mask)V, SwiGLU."""
    w = {k: v.double() for k, v in state.items()}
    batch, seq_len = tokens.shape
    hd, n_rep = args.head_dim, args.n_heads // args.kv_heads
    freqs_cis = meta_freqs_cis(hd, seq_len, args.rope_theta).to(torch.complex128)
    mask = torch.full((seq_len, seq_len), float("-inf"), dtype=torch.float64).triu(1)

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * weight

    h = w["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = norm(h, w[p + "attention_norm.weight"])
        q = (x @ w[p + "attention.wq.weight"].T).view(batch, seq_len, args.n_heads, hd)
        k = (x @ w[p + "attention.wk.weight"].T).view(batch, seq_len, args.kv_heads, hd)
        v = (x @ w[p + "attention.wv.weight"].T).view(batch, seq_len, args.kv_heads, hd)
        q, k = meta_apply_rotary_emb(q, freqs_cis), meta_apply_rotary_emb(k, freqs_cis)
        k, v = k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)  # Meta's repeat_kv
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5 + mask
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, seq_len, -1)
        h = h + attn @ w[p + "attention.wo.weight"].T
        x = norm(h, w[p + "ffn_norm.weight"])
        gate, up = x @ w[p + "feed_forward.w1.weight"].T, x @ w[p + "feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return norm(h, w["norm.weight"]) @ w["output.weight"].T


# --- ModelArgs ---------------------------------------------------------------------------------

def test_hidden_dim_follows_meta_rule():
    """SwiGLU widths of real Meta checkpoints (and the bundled model)."""
    assert ModelArgs(dim=4096, multiple_of=256).hidden_dim == 11008  # Llama 7B
    assert ModelArgs(dim=5120, multiple_of=256).hidden_dim == 13824  # Llama 13B
    assert ModelArgs(dim=8192, multiple_of=256).hidden_dim == 22016  # Llama 1 65B
    assert ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).hidden_dim == 28672  # Llama 2 70B
    assert STORIES_ARGS.hidden_dim == 172


def test_model_args_from_meta_params():
    llama1_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}
    args = params.model_args(llama1_7b, 32000)
    assert (args.vocab_size, args.kv_heads, args.head_dim, args.norm_eps) == (32000, 32, 128, 1e-6)
    llama2_70b = {
        "dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
        "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1,
    }
    args = params.model_args(llama2_70b, 32000)
    assert (args.kv_heads, args.head_dim, args.hidden_dim) == (8, 128, 28672)
    with pytest.raises(UserError, match="unknown keys"):
        params.model_args({**llama1_7b, "n_expert": 8}, 32000)
    with pytest.raises(UserError, match="tokenizer has 32000 tokens"):
        params.model_args({**llama1_7b, "vocab_size": 32001}, 32000)


# --- RoPE and RMSNorm --------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (128, 10000.0), (128, 500000.0)])
@pytest.mark.parametrize("start", [0, 3000])
def test_rope_matches_meta_complex_rotation(device: str, head_dim: int, theta: float, start: int):
    seq_len = 24
    x = torch.randn(2, seq_len, 3, head_dim, generator=torch.Generator().manual_seed(1))
    expected = meta_apply_rotary_emb(x, meta_freqs_cis(head_dim, start + seq_len, theta)[start:])
    rope = precompute_rope(head_dim, start + seq_len, theta=theta, device=device)[start:]
    torch.testing.assert_close(apply_rope(x.to(device), rope).cpu(), expected, rtol=0, atol=1e-5)
    x16 = x.to(device, torch.bfloat16)
    out16 = apply_rope(x16, rope)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.cpu(), meta_apply_rotary_emb(x16.cpu(), meta_freqs_cis(head_dim, start + seq_len, theta)[start:]))


def test_rope_depends_only_on_relative_position():
    """<R_m q, R_n k> = <R_(m+s) q, R_(n+s) k>, and rotation keeps norms."""
    head_dim, gen = 64, torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, head_dim, generator=gen), torch.randn(1, 1, 1, head_dim, generator=gen)
    rope = precompute_rope(head_dim, 600, theta=10000.0)

    def dot(m: int, n: int) -> float:
        return (apply_rope(q, rope[m : m + 1]) * apply_rope(k, rope[n : n + 1])).sum().item()

    assert dot(7, 3) == pytest.approx(dot(507, 503), abs=1e-4)
    assert dot(7, 3) != pytest.approx(dot(8, 3), abs=1e-2)
    assert apply_rope(q, rope[123:124]).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


def test_rope_frequencies_match_the_checkpoint():
    """Meta's files carry rope.freqs: the angle at position 1 is exactly that frequency."""
    freqs = torch.load(STORIES / "consolidated.00.pth", weights_only=True, mmap=True)["rope.freqs"]
    table = precompute_rope(STORIES_ARGS.head_dim, 2, theta=STORIES_ARGS.rope_theta)
    torch.testing.assert_close(torch.atan2(table[1, :, 1, 1], table[1, :, 0, 0]), freqs.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_rmsnorm(device: str):
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(3, 5, 64, generator=gen), 1 + 0.1 * torch.randn(64, generator=gen)
    norm = RMSNorm(64, eps=1e-5).to(device)
    norm.weight.data.copy_(weight)
    x64 = x.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    torch.testing.assert_close(norm(x.to(device)).cpu().double(), expected, rtol=1e-6, atol=1e-6)
    # float16 squares of 1000 overflow (65504): the norm must run in float32, as Meta's does.
    big = (1000 * x).half().to(device)
    out = norm.half()(big)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-3, atol=2e-3)


def test_norm_and_rope_keep_metas_float32_arithmetic_bit_for_bit():
    """RMSNorm (one fused op in float32) and RoPE (two products and a sum over a per-pair table) round as
    Meta's written-out formulas do: x * rsqrt(mean(x^2) + eps) * w, and (x0 c - x1 s, x1 c + x0 s) with
    real cos/sin (the form this project used before, and Meta's complex product's arithmetic). On CPU
    they are equal bit for bit; golden ids depend on it only through near ties, but exactness keeps the
    comparison simple."""
    gen = torch.Generator().manual_seed(4)
    for dim in (64, 768, 4096):
        x, weight = torch.randn(2, 9, dim, generator=gen), 1 + 0.1 * torch.randn(dim, generator=gen)
        norm = RMSNorm(dim, eps=1e-5)
        norm.weight.data.copy_(weight)
        assert torch.equal(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight)
    head_dim = 128
    table = precompute_rope(head_dim, 40, theta=10000.0)
    cos, sin = table[..., 0, 0], table[..., 1, 1]
    assert torch.equal(table[..., 0, 1], cos) and torch.equal(table[..., 1, 0], -sin)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 40, 3, head_dim, generator=gen).to(dtype)
        pairs = x.float().reshape(2, 40, 3, -1, 2)
        c, s = cos.view(1, 40, 1, -1), sin.view(1, 40, 1, -1)
        real = pairs[..., 0] * c - pairs[..., 1] * s
        imag = pairs[..., 1] * c + pairs[..., 0] * s
        assert torch.equal(apply_rope(x, table), torch.stack([real, imag], dim=-1).flatten(3).type_as(x))


# --- the whole forward -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["stories260K", "llama2-style"])
def test_logits_match_meta_reference(world1, device: str, name: str):
    args, state = model_and_state(name)
    tokens = random_tokens(args, 2, 20)
    logits = build(args, state, device)(tokens.to(device), 0).cpu()
    assert logits.dtype == torch.float32 and logits.shape == (2, 20, args.vocab_size)
    torch.testing.assert_close(logits.double(), meta_reference_logits(args, state, tokens), rtol=0, atol=REF_ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["stories260K", "llama2-style"])
def test_cache_prefill_decode_and_chunks_equal_one_full_forward(world1, device: str, name: str):
    """Prefill-then-decode (eager, and the static-shape step torch.compile uses), chunked prefill
    and the cache-free (training) forward all give the logits of one full forward."""
    args, state = model_and_state(name)
    tokens = random_tokens(args, 2, 24).to(device)
    model = build(args, state, device)
    with torch.inference_mode():
        full = model(tokens, 0)
        decoded = [model(tokens[:, :9], 0)] + [model(tokens[:, pos : pos + 1], pos) for pos in range(9, 24)]
        torch.testing.assert_close(torch.cat(decoded, dim=1), full, rtol=0, atol=SAME_ATOL)
        static = [model(tokens[:, :9], 0)]
        for pos in range(9, 24):  # a position per row, attention over the whole (masked) cache
            span = CacheSpan(slice(0, 2), torch.tensor([pos, pos], device=device))
            static.append(model.output(model.hidden_states(tokens[:, pos : pos + 1], span)).float())
        torch.testing.assert_close(torch.cat(static, dim=1), full, rtol=0, atol=SAME_ATOL)
        bounds = [0, 5, 6, 17, 24]
        chunks = [model(tokens[:, a:b], a) for a, b in zip(bounds, bounds[1:])]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=SAME_ATOL)
        # A shorter new prompt from position 0 must not see the longer one's stale cache entries.
        torch.testing.assert_close(model(tokens[:, :11], 0), full[:, :11], rtol=0, atol=SAME_ATOL)
    no_cache = build(args, state, device, kv_cache=False)
    torch.testing.assert_close(no_cache(tokens, 0), full, rtol=0, atol=SAME_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_at_their_own_positions_equal_each_row_alone(world1, device: str):
    """Three sequences prefilled into cache rows 2, 0, 1 (one at a time, as the engine admits them),
    then one decode step with every row at its own position: each row's logits equal that sequence's
    full forward alone."""
    args, state = model_and_state("llama2-style")
    model = build(args, state, device)
    seqs = [random_tokens(args, 1, n, seed=n)[0].to(device) for n in (7, 12, 4)]
    rows = [2, 0, 1]
    with torch.inference_mode():
        alone = {row: model(seq[None], 0)[0, -1] for row, seq in zip(rows, seqs)}  # through cache row 0, before the rows are filled
        for row, seq in zip(rows, seqs):
            model.hidden_states(seq[None, :-1], CacheSpan(slice(row, row + 1), 0))
        last = torch.stack([seqs[rows.index(r)][-1] for r in range(3)]).view(3, 1)
        positions = torch.tensor([len(seqs[rows.index(r)]) - 1 for r in range(3)], device=device)
        for length in (None, int(positions.max()) + 1):  # static shape (compiled) and cut to the longest row (eager)
            step = model.output(model.hidden_states(last, CacheSpan(slice(0, 3), positions, length))).float()[:, -1]
            for r in range(3):
                torch.testing.assert_close(step[r], alone[r], rtol=0, atol=SAME_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_and_rows_independent(world1, device: str):
    """Earlier positions ignore later tokens; a row's logits do not depend on its batch mates."""
    args, state = model_and_state("llama2-style")
    model = build(args, state, device)
    tokens = random_tokens(args, 3, 16).to(device)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % args.vocab_size
    with torch.inference_mode():
        full, other = model(tokens, 0), model(changed, 0)
        torch.testing.assert_close(other[:, :10], full[:, :10], rtol=0, atol=SAME_ATOL)
        assert (other[:, 10:] - full[:, 10:]).abs().max() > 1e-2
        torch.testing.assert_close(model(tokens[1:2], 0), full[1:2], rtol=0, atol=SAME_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_gqa_equals_repeated_kv_heads(world1, device: str):
    """n_kv_heads=2 equals n_kv_heads=8 with each key/value head copied to its 4 query heads
    (query head h uses kv head h // 4, Meta's repeat_kv grouping)."""
    args, state = model_and_state("llama2-style")
    n_rep, hd = args.n_heads // args.kv_heads, args.head_dim
    mha_args = ModelArgs(**{**args.__dict__, "n_kv_heads": None})
    mha_state = dict(state)
    for key in state:
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = state[key].view(args.kv_heads, hd, args.dim)
            mha_state[key] = heads.repeat_interleave(n_rep, dim=0).reshape(args.n_heads * hd, args.dim)
    tokens = random_tokens(args, 2, 12).to(device)
    with torch.inference_mode():
        gqa = build(args, state, device)(tokens, 0)
        mha = build(mha_args, mha_state, device)(tokens, 0)
    torch.testing.assert_close(gqa, mha, rtol=0, atol=SAME_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_soft_prompt_prefix_acts_like_tokens(world1, device: str):
    """A prefix equal to some tokens' embeddings gives the hidden states of those tokens prepended."""
    args, state = model_and_state("stories260K")
    model = build(args, state, device)
    tokens = random_tokens(args, 2, 14).to(device)
    with torch.inference_mode():
        prefix = model.tok_embeddings(tokens[:, :5])
        with_prefix = model.hidden_states(tokens[:, 5:], prefix=prefix)
        plain = model.hidden_states(tokens)
    torch.testing.assert_close(with_prefix, plain[:, 5:], rtol=0, atol=SAME_ATOL)


def test_cache_misuse_is_an_error(world1):
    args, state = model_and_state("stories260K")
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        build(args, state, "cpu")(random_tokens(args, 1, args.max_seq_len + 1), 0)
    with pytest.raises(ValueError, match="needs a KV cache"):
        build(args, state, "cpu", kv_cache=False)(random_tokens(args, 1, 2), 3)
