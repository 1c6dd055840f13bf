"""Llama 3.x forwards against transformers' LlamaForCausalLM, on 1 and 2 tensor-parallel ranks.

Model: random Llama-3.1-shaped weights (GQA 8:4, use_scaled_rope, rope_theta 500000,
ffn_dim_multiplier 1.3 with multiple_of 1024, vocab 128256, dim 128, 2 layers) written as Meta
files: one shard, two shards split on the vocabulary (Meta's Llama 3 layout) and on the embedding
dim (Llama 2's), a Llama-3.2-style tied copy (no output.weight), and params.json variants. The
reference is transformers' own forward (eager attention, `rope_type: llama3`) with the same
weights under HF's names, q/k rows permuted the way transformers' conversion script does.

RoPE scaling only shows where attention depends on position: wq and wk are scaled up (sharp,
position-selective attention) and the sequence is 320 tokens long, so switching the scaling off
moves the logits by thousands of tolerances (checked, so the comparison can fail).
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from dist_utils import torchrun
from llama3_worker import TOKENS, VOCAB, load, logit_columns
from references import DATA, REPO

from llama import files, formats
from llama.errors import UserError
from llama.formats import layout, params
from llama.formats.convert import reshard
from llama.model import META_ROPE_SCALING, precompute_rope, scale_rope_freqs

PARAMS = {"dim": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "vocab_size": VOCAB, "multiple_of": 1024,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
HIDDEN = 1024  # Meta's rule: int(2 * 4 * 128 / 3) = 341, * 1.3 -> 443, rounded up to a multiple of 1024
QK_SCALE = 3.0  # q and k entries ~N(0, 9): scores q.k/sqrt(16) ~N(0, 81), softmax close to one-hot
SCALING_32 = {**META_ROPE_SCALING, "factor": 32.0}  # what HF's Llama 3.2 configs state
# float32, ours vs transformers: other RoPE layout, SDPA vs explicit softmax, other summation
# orders. The large q/k make the attention scores the weak point: |q|, |k| reach ~20, so scores
# |q||k|/sqrt(16) reach ~100, and q, k come out of dots of length 128 rounded to ~sqrt(128) * 6e-8
# (float32 unit roundoff) relative: ~7e-5 per score. A softmax weight moves by that relatively, an
# attention output by at most 7e-5 * |v| (|v| <= ~4) = 3e-4 per layer when every error aligns; they
# mostly cancel over heads and positions, and the output rows (norm ~1) do not amplify. Logits are
# below ~6 (ulp 5e-7). So 5e-4 absolute; ten times what HF and ours actually differ by here.
TOL = dict(rtol=0.0, atol=5e-4)
ATOL = TOL["atol"]


# --- the reference: transformers' LlamaForCausalLM with the same weights ------------------------------

def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py `permute`: Meta's interleaved rotary pairs -> rotate-half rows."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layer_names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
                   "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                   "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if "output.weight" in state:
        hf["lm_head.weight"] = state["output.weight"]
    for i in range(PARAMS["n_layers"]):
        for meta, name in layer_names.items():
            w = state[f"layers.{i}.{meta}.weight"]
            if meta == "attention.wq":
                w = hf_permute(w, PARAMS["n_heads"])
            elif meta == "attention.wk":
                w = hf_permute(w, PARAMS["n_kv_heads"])
            hf[f"model.layers.{i}.{name}.weight"] = w
    return hf


def hf_logits(state: dict[str, torch.Tensor], scaling: dict | None, tied: bool) -> torch.Tensor:
    """transformers' logits [T, vocab] of TOKENS; `scaling` None is plain RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", **scaling} if scaling else {"rope_type": "default"}
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=PARAMS["dim"], intermediate_size=HIDDEN, num_hidden_layers=PARAMS["n_layers"],
        num_attention_heads=PARAMS["n_heads"], num_key_value_heads=PARAMS["n_kv_heads"], rms_norm_eps=PARAMS["norm_eps"],
        max_position_embeddings=131072, rope_parameters={**rope, "rope_theta": PARAMS["rope_theta"]},
        tie_word_embeddings=tied, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    result = model.load_state_dict(hf_state_dict(state), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == (["lm_head.weight"] if tied else [])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.inference_mode():
        return model(TOKENS).logits[0]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """Llama-3.1-shaped random weights with wq, wk scaled up (position-selective attention)."""
    weights = layout.random_state_dict(params.model_args(PARAMS), seed=0)
    for key in weights:
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            weights[key] = weights[key] * QK_SCALE
    return weights


@pytest.fixture(scope="module")
def tied_state(state) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != "output.weight"}


@pytest.fixture(scope="module")
def reference(state, tied_state):
    """reference(scaling, tied) -> transformers' logits, each computed once."""
    cache = {}

    def get(scaling: dict | None = META_ROPE_SCALING, tied: bool = False) -> torch.Tensor:
        key = (json.dumps(scaling, sort_keys=True), tied)
        if key not in cache:
            cache[key] = hf_logits(tied_state if tied else state, scaling, tied)
        return cache[key]

    return get


# --- the checkpoints ------------------------------------------------------------------------------

def write_meta(directory: Path, params: dict, shards: list[dict] | Path) -> Path:
    """params.json plus shards (state dicts), or a link to another checkpoint's single shard."""
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(params))
    if isinstance(shards, Path):
        os.symlink(shards / "consolidated.00.pth", directory / "consolidated.00.pth")
    else:
        for rank, shard in enumerate(shards):
            torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    return directory


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, state, tied_state) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama3")
    base = write_meta(root / "llama31", PARAMS, [state])
    split = {f"mp2_{name}": [layout.shard_state_dict(state, r, 2, vocab_parallel=vp) for r in range(2)]
             for name, vp in (("vocab", True), ("dim", False))}
    return {
        "llama31": base,
        **{name: write_meta(root / name, PARAMS, shards) for name, shards in split.items()},
        "tied": write_meta(root / "tied", PARAMS, [tied_state]),
        "factor32_meta": write_meta(root / "factor32_meta", {**PARAMS, "rope_scaling_factor": 32.0}, base),
        "factor32_hf": write_meta(root / "factor32_hf", {**PARAMS, "rope_scaling": SCALING_32}, base),
        "extra_keys": write_meta(root / "extra_keys", {**PARAMS, "vision_chunk_size": 560, "vision_max_num_chunks": 4,
                                                       "quantization_args": {"group_size": 32}}, base),
        "unknown_key": write_meta(root / "unknown_key", {**PARAMS, "n_experts": 16}, base),
        "unscaled": write_meta(root / "unscaled", {**PARAMS, "use_scaled_rope": False}, base),
    }


def logits_of(ckpt_dir: Path, parallel, **overrides) -> torch.Tensor:
    with torch.inference_mode():
        return load(ckpt_dir, parallel, **overrides)(TOKENS)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- RoPE scaling against Meta's apply_scaling -----------------------------------------------------

def meta_apply_scaling(freqs: list[float], factor: float, low_freq_factor: float, high_freq_factor: float,
                       old_context_len: int) -> list[float]:
    """Meta's llama3.1 `apply_scaling` (llama_models/llama3/reference_impl/model.py), in Python floats."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / factor + smooth * freq)
    return new_freqs


@pytest.mark.parametrize("head_dim", [128, 16])
@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_scale_rope_freqs_is_metas_apply_scaling(head_dim: int, factor: float):
    """float64: the same IEEE operations in the same order, so equal to an ulp; every branch is hit.
    The float32 table the model uses turns by those frequencies (to float32 rounding, 1e-6 relative)."""
    freqs = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaling = {**META_ROPE_SCALING, "factor": factor}
    want = torch.tensor(meta_apply_scaling(freqs.tolist(), factor, 1.0, 4.0, 8192), dtype=torch.float64)
    got = scale_rope_freqs(freqs, **scaling)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=2 * 2**-52, atol=0)
    assert (got == freqs).any() and (got == freqs / factor).any(), "kept and divided frequencies"
    assert ((got != freqs) & (got != freqs / factor)).any(), "a frequency in the smooth band"
    table = precompute_rope(head_dim, 2, theta=500000.0, scaling=scaling)
    torch.testing.assert_close(torch.atan2(table[1, :, 1, 1], table[1, :, 0, 0]), want.float(), rtol=1e-6, atol=1e-7)


# --- Llama 3.1 on one rank ------------------------------------------------------------------------

@pytest.mark.slow
def test_llama31_params_read_as_meta_means(ckpts):
    args = formats.open_checkpoint(ckpts["llama31"]).args
    assert (args.kv_heads, args.head_dim, args.hidden_dim, args.vocab_size) == (4, 16, HIDDEN, VOCAB)
    assert args.use_scaled_rope and args.rope_scaling is None and args.rope_theta == 500000.0
    assert args.vocab_parallel_embedding, "a one-shard Llama 3 file: Meta's vocab-split layout"


@pytest.mark.slow
def test_llama31_logits_match_transformers(world1, ckpts, reference):
    torch.testing.assert_close(logits_of(ckpts["llama31"], world1), reference(), **TOL)


@pytest.mark.slow
def test_switching_rope_scaling_off_moves_logits_far_beyond_tolerance(world1, ckpts, reference):
    """Without scaling the logits leave HF's llama3 ones by > 1000 tolerances (2.9 measured), and
    match HF's plain RoPE instead: the difference is the scaling and nothing else. At position 0
    (angle 0) the two agree."""
    unscaled = logits_of(ckpts["unscaled"], world1)
    assert max_diff(unscaled, reference()) > 1000 * ATOL
    assert max_diff(unscaled[0], reference()[0]) <= ATOL
    torch.testing.assert_close(unscaled, reference(scaling=None), **TOL)


@pytest.mark.slow
def test_prefill_then_decode_equals_full_forward(world1, ckpts):
    """256 prompt positions at once, then 64 single-token steps through the KV cache, equal one
    forward of all 320 (float32 in another summation order: the same TOL)."""
    model = load(ckpts["llama31"], world1)
    with torch.inference_mode():
        full = model(TOKENS)
        steps = [model(TOKENS[:, :256], 0)] + [model(TOKENS[:, pos : pos + 1], pos) for pos in range(256, TOKENS.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


# --- Llama 3.2: tied embeddings -------------------------------------------------------------------

@pytest.mark.slow
def test_tied_checkpoint_uses_the_embedding_as_output(world1, ckpts, state, reference):
    ckpt = formats.open_checkpoint(ckpts["tied"])
    assert ckpt.tied and "output.weight" in ckpt.keys
    model = load(ckpts["tied"], world1)
    assert torch.equal(model.output.weight, state["tok_embeddings.weight"])
    assert torch.equal(model.tok_embeddings.weight, state["tok_embeddings.weight"])
    with torch.inference_mode():
        logits = model(TOKENS)[0]
    torch.testing.assert_close(logits, reference(tied=True), **TOL)
    assert max_diff(logits, reference()) > 100 * ATOL, "tied and untied outputs must differ"


# --- params.json variants ---------------------------------------------------------------------------

@pytest.mark.slow
def test_params_extra_keys_are_noted_unknown_keys_refused(ckpts, capsys):
    args = formats.open_checkpoint(ckpts["extra_keys"]).args
    note = capsys.readouterr().err
    assert "note:" in note and "vision_chunk_size" in note and "quantization_args" in note
    assert args == formats.open_checkpoint(ckpts["llama31"]).args
    with pytest.raises(UserError, match=r"unknown keys \['n_experts'\]"):
        formats.open_checkpoint(ckpts["unknown_key"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["factor32_meta", "factor32_hf"])
def test_rope_constants_stated_in_params_are_used(world1, ckpts, reference, name: str):
    """factor 32 in params.json (Meta's `rope_scaling_factor` or HF's `rope_scaling`) gives HF's
    factor-32 logits, far from factor 8's (0.44 measured); an override brings factor 8 back."""
    assert formats.open_checkpoint(ckpts[name]).args.rope_scaling == SCALING_32
    logits = logits_of(ckpts[name], world1)
    torch.testing.assert_close(logits, reference(SCALING_32), **TOL)
    assert max_diff(logits, reference()) > 200 * ATOL
    if name == "factor32_meta":
        torch.testing.assert_close(logits_of(ckpts[name], world1, rope_scaling_factor=META_ROPE_SCALING["factor"]), reference(), **TOL)


# --- multi-shard files: the embedding's split is read from the files --------------------------------

@pytest.mark.slow
def test_embedding_split_is_decided_from_the_files(world1, ckpts, state):
    """Two shards of the same weights, embedding split on the vocab (Llama 3) or on dim (Llama 2):
    each is recognised and loads on one rank to the one-shard file's logits, bit for bit."""
    one_shard = logits_of(ckpts["llama31"], world1)
    for name, vocab_parallel, piece in (("mp2_vocab", True, (VOCAB // 2, 128)), ("mp2_dim", False, (VOCAB, 64))):
        ckpt = formats.open_checkpoint(ckpts[name])
        assert ckpt.args.vocab_parallel_embedding == vocab_parallel, name
        assert [tuple(p.shape) for p in ckpt.pieces("tok_embeddings.weight")] == [piece, piece]
        assert torch.equal(ckpt.read("tok_embeddings.weight"), state["tok_embeddings.weight"]), name
        assert torch.equal(logits_of(ckpts[name], world1), one_shard), name


@pytest.mark.slow
def test_reshard_keeps_the_vocab_split(ckpts, state, tmp_path):
    """Vocab-split 2 shards -> 1 and 4 shards: the embedding stays split on dim 0 and joins back to
    the original; Llama 2 style files (stories260K_mp2) stay split on dim 1."""
    embedding = state["tok_embeddings.weight"]
    for n in (1, 4):
        out = reshard(ckpts["mp2_vocab"], num_shards=n, out_dir=tmp_path / f"vocab{n}", progress=False)
        pieces = [files.load_file(out / f"consolidated.{r:02d}.pth")["tok_embeddings.weight"] for r in range(n)]
        assert all(p.shape == (VOCAB // n, 128) for p in pieces)
        assert torch.equal(torch.cat(pieces, dim=0), embedding)
        assert formats.open_checkpoint(out).args.vocab_parallel_embedding
    stories_mp2 = DATA / "stories260K_mp2"
    assert not formats.open_checkpoint(stories_mp2).args.vocab_parallel_embedding
    given = [files.load_file(stories_mp2 / f"consolidated.{r:02d}.pth")["tok_embeddings.weight"] for r in range(2)]
    out = reshard(stories_mp2, num_shards=1, out_dir=tmp_path / "stories1", progress=False)
    whole = files.load_file(out / "consolidated.00.pth")["tok_embeddings.weight"]
    assert whole.shape == (512, 64) and torch.equal(whole, torch.cat(given, dim=1))
    stories = files.load_file(REPO / "ckpts" / "stories260K" / "consolidated.00.pth")["tok_embeddings.weight"]
    assert torch.equal(whole, stories)


# --- two ranks (torchrun, gloo) ---------------------------------------------------------------------

TP2_CKPTS = ["llama31", "mp2_vocab", "tied"]


@pytest.fixture(scope="module")
def tp2_outputs(ckpts, tmp_path_factory) -> dict[tuple[str, int], dict]:
    out = tmp_path_factory.mktemp("llama3_tp2")
    result = torchrun(2, REPO / "tests" / "llama3_worker.py", "--out", out, *(ckpts[n] for n in TP2_CKPTS), timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return {(name, rank): torch.load(out / f"{ckpts[name].name}.rank{rank}.pt", weights_only=True)
            for name in TP2_CKPTS for rank in range(2)}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", TP2_CKPTS)
def test_two_ranks_match_transformers(name: str, tp2_outputs, reference):
    """Column-parallel output (for the tied file: the embedding split on the vocab), vocab-split
    embedding, heads split 4 + 2 kv per rank: both ranks' gathered logits equal HF's."""
    want = reference(tied=name == "tied")[:, logit_columns(VOCAB)]
    for rank in range(2):
        got = tp2_outputs[name, rank]
        torch.testing.assert_close(got["logits"], want, **TOL, msg=lambda m: f"{name} rank {rank}: {m}")
        assert got["output_is_embedding"] == (name == "tied"), f"{name} rank {rank}"



@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_get_the_same_slices_from_one_or_two_shards(tp2_outputs):
    """On 2 ranks the vocab-split 2-shard file gives each rank the 1-shard file's slices, so the
    same arithmetic: bit-identical logits."""
    for rank in range(2):
        assert torch.equal(tp2_outputs["mp2_vocab", rank]["logits"], tp2_outputs["llama31", rank]["logits"]), rank
