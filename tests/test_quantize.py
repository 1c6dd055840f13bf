"""Weight-only quantization (llama/kernels: schemes.py, linear.py): kernels, slicing, TP=2, quality, QLoRA, bad input.

References this project did not produce: the int4 scheme (scales, zeros, codes) is compared with
gpt-fast's formulas written out here and with torchao's groupwise_affine_quantize_tensor (if
installed); the float reference of each int kernel is F.linear with the weights the pure scheme
functions dequantize to (they never touch the kernel's packed layout, so a packing bug cannot
cancel out), that of the NF4 kernel bitsandbytes' dequantize_4bit; NF4 codes and absmax come from
bitsandbytes' own quantize_4bit of each rank's slice; TP=2 (tests/quant_worker.py) is compared
with a TP=1 float model built from the gathered dequantized slices; quality is measured against
llama2.c's golden ids and the unquantized model.
"""

import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from dist_utils import in_process, python, torchrun
from references import GOLDEN, REPO, STORIES
from test_ft_main import FAST, evals, losses

sys.path.insert(0, str(REPO))
from quant_worker import GEN_LEN, LOGIT_TOKENS, PROMPT, activation_errors, kernel_check, scheme_dequantized  # noqa: E402

import ft_main  # noqa: E402
from llama import formats  # noqa: E402
from llama import lora  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.errors import UserError  # noqa: E402
from llama.formats import adapters, layout  # noqa: E402
from llama.formats.load import load_model  # noqa: E402
from llama.kernels import schemes  # noqa: E402
from llama.kernels import linear  # noqa: E402
from llama.kernels.linear import FbgemmInt8Linear, Int8Linear, NF4Linear, QuantizedLinear  # noqa: E402
from llama.kernels.schemes import parse_scheme  # noqa: E402

bnb_f = pytest.importorskip("bitsandbytes.functional")
INT_SCHEMES = ["int8", "int4-g32", "int4-g128"]
SCHEMES = [*INT_SCHEMES, "nf4"]
# The int kernels compute with bfloat16 activations (8 significant bits, unit roundoff 2^-8): the
# input is rounded once, the int4 kernel may form (q - 8) s + z in bfloat16, and the output is
# rounded once, so |kernel - F.linear(x, W_deq)| <= 3 * 2^-8 * (|x| @ |W_deq|^T) with W_deq the
# float32 weights the scheme dequantizes to, plus float32 accumulation over K <= 192 terms
# (K * 2^-24 relative, < 2^-16). A wrong nibble order, tile or group in the packed layout moves an
# output by a whole quantization step of its weights, far beyond 2^-7 relative.
KERNEL_REL = 3 * 2**-8 + 192 * 2**-24
N_LINEARS = 35  # 7 block linears x 5 layers; under int8 and int4 the output head is quantized too (int8)
HELD_OUT = 16  # alpaca outputs (records the tuning tests never train on: they are not in any run here)


def load(scheme, tp_rank=0, tp_size=1, max_seq_len=512):
    """The bundled model in float32 on CPU, its block linears quantized by `scheme` (--quantize text or None), no KV cache."""
    spec = LoadSpec(STORIES, max_seq_len=max_seq_len, max_batch_size=0, dtype=torch.float32, quantize=parse_scheme(scheme or "none"))
    return load_model(spec, vocab_size=512, device=torch.device("cpu"), tp_rank=tp_rank, tp_size=tp_size)


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    """Weight name (`layers.N.attention.wq.weight`) -> the kernel holding that weight."""
    return {name.removesuffix(".kernel") + ".weight": module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def dense_from(weights: dict[str, torch.Tensor]):
    """The bundled model at TP=1 in float32 with `weights` (full tensors) in place of its linears."""
    model = load(None)
    state = model.state_dict()
    state.update(weights)
    model.load_state_dict(state, assign=True)
    return model


# --- kernels ---------------------------------------------------------------------------------------------

@pytest.fixture
def portable_int8(monkeypatch):
    """int8 through _weight_int8pack_mm (CUDA's kernel, and CPU's where fbgemm is missing) on this CPU too."""
    monkeypatch.setattr(linear, "fbgemm_reduce_range", lambda: None)


def inputs(in_features: int, kind: str) -> torch.Tensor:
    """x [2, 7, in]: normal, with 4 outlier channels x30 (they stretch a per-call activation scale), or one row x100."""
    x = torch.randn(2, 7, in_features, generator=torch.Generator().manual_seed(1))
    if kind == "outliers":
        x[..., :4] *= 30
    elif kind == "large row":
        x[1, 3] *= 100
    return x


KERNELS = {"int8": ("int8", False), "int8 portable": ("int8", True), "int4-g32": ("int4-g32", False), "int4-g128": ("int4-g128", False)}


@pytest.mark.parametrize("kernel_name", KERNELS)
@pytest.mark.parametrize("layer", ["layers.1.attention.wq", "layers.1.feed_forward.w1", "layers.1.attention.wo", "layers.1.feed_forward.w2", "output"])
def test_int_kernels_equal_float_reference_of_the_schemes_dequantized_weights(world1, monkeypatch, kernel_name, layer):
    """Column- (wq, w1: 172 rows, output: 512) and row-parallel (wo, w2: 172 columns, padded) layers at TP=1,
    with the kernel the loader picks on this machine ("int8": fbgemm on a CPU where its probe passes) and
    the portable int8 one: the kernel's product against F.linear with the checkpoint's weight quantized
    and dequantized by the pure scheme functions, within the bound derived from the kernel's arithmetic
    (quant_worker.kernel_error_bound), for normal inputs, outlier channels and one large row; the weight
    the kernel reports it multiplies by (int4: read back through the kernel itself) is that one exactly.
    The output head is int8 under every int scheme (schemes.head_scheme)."""
    scheme, portable = KERNELS[kernel_name]
    if portable:
        monkeypatch.setattr(linear, "fbgemm_reduce_range", lambda: None)
    kernel = quantized_layers(load(scheme))[layer + ".weight"]
    if portable:
        assert isinstance(kernel, Int8Linear)
    elif kernel.scheme.name == "int8" and linear.fbgemm_reduce_range() is not None:
        assert isinstance(kernel, FbgemmInt8Linear)
    W = scheme_dequantized(formats.open_checkpoint(STORIES).read(layer + ".weight").float(), str(kernel.scheme), kernel.scale_dtype)
    for kind in ("normal", "outliers", "large row"):
        assert kernel_check(kernel, W, inputs(kernel.in_features, kind)) <= 1, kind
    assert kernel(inputs(kernel.in_features, "normal")).dtype == torch.float32 and W.shape == (kernel.out_features, kernel.in_features)
    assert torch.equal(kernel.dequantize(), W)  # int4: the codes the kernel unpacks are the scheme's


def test_fbgemm_activation_bits_are_what_this_cpu_adds_without_saturating():
    """The load-time probe: 7-bit activations where fbgemm adds u8 x s8 pairs in int16 (no VNNI: 2 * 255 * 127
    overflows it), 8 bits where it adds in int32. On a CPU without VNNI the 8-bit call is visibly wrong."""
    reduce_range = linear.fbgemm_reduce_range()
    if reduce_range is None:
        pytest.skip("fbgemm's dynamic int8 linear is not available here: int8 runs _weight_int8pack_mm")
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    vnni = caps.get("avx512_vnni") or caps.get("avx_vnni")
    packed = linear.fbgemm_prepack(torch.full((16, 64), 127, dtype=torch.int8), torch.ones(16))
    eight_bits = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), packed, False)
    if not vnni:
        assert reduce_range and eight_bits.max() < 8000  # saturated: 4111.9 on AVX2
    assert reduce_range == (eight_bits.max().item() != pytest.approx(8128.0, rel=1e-5))
    # whichever it is, a kernel made with it satisfies its bound (the kernel test) on a random weight
    kernel = FbgemmInt8Linear(torch.randn(48, 100, generator=torch.Generator().manual_seed(0)), reduce_range)
    W = kernel.dequantize()
    assert kernel_check(kernel, W, inputs(100, "normal")) <= 1


def gpt_fast_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gpt-fast's get_group_qparams + group_quantize_tensor_from_qparams (quantize.py), written out:
    (codes int32 [out, in], scales [out, groups], zeros [out, groups]) in bfloat16, as gpt-fast stores them."""
    groups = w.reshape(-1, group_size)
    max_val, min_val = groups.amax(dim=1, keepdim=True), groups.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-6) / 15
    zeros = min_val + scales * 8
    scales, zeros = scales.to(torch.bfloat16), zeros.to(torch.bfloat16)
    low = zeros - scales * 8  # in bfloat16, as gpt-fast computes it
    codes = groups.sub(low).div(scales).round().clamp_(0, 15).to(torch.int32).reshape_as(w)
    return codes, scales.reshape(w.size(0), -1), zeros.reshape(w.size(0), -1)


def torchao_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchao's groupwise_affine_quantize_tensor (tinygemm's format; CPU: unpacked int32 codes), same outputs."""
    utils = pytest.importorskip("torchao.quantization.utils")
    codes, scales_and_zeros = utils.groupwise_affine_quantize_tensor(w, 4, group_size, torch.bfloat16)
    return codes, scales_and_zeros[..., 0].t(), scales_and_zeros[..., 1].t()


@pytest.mark.slow
@pytest.mark.parametrize("group_size", schemes.INT4_GROUP_SIZES)
@pytest.mark.parametrize("reference", [gpt_fast_int4, torchao_int4], ids=["gpt-fast", "torchao"])
@pytest.mark.parametrize("key", ["layers.1.attention.wq.weight", "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w2.weight"])
def test_int4_scheme_equals_independent_quantizers(reference, group_size, key):
    """schemes.quantize_int4 on the bundled model's weights (wq: no padding; w1: 172 rows, padded to
    176; w2: 172 columns, padded to groups) against a quantizer of the same scheme written elsewhere,
    fed the same zero-padded weight (the kernel needs that padding; its rows are then cut off)."""
    W = formats.open_checkpoint(STORIES).read(key).float()
    q, scales_and_zeros = schemes.quantize_int4(W, group_size, torch.bfloat16)
    out_features, in_features = W.shape
    q_ref, s_ref, z_ref = reference(F.pad(W, (0, q.size(1) - in_features, 0, q.size(0) - out_features)), group_size)
    real = slice(0, out_features)  # all-zero padding rows: torchao clamps their scale after dividing by 15, gpt-fast before
    q, s, z = q[real], scales_and_zeros[..., 0].t()[real], scales_and_zeros[..., 1].t()[real]
    q_ref, s_ref, z_ref = q_ref[real], s_ref[real], z_ref[real]
    assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 15
    assert torch.equal(s, s_ref)  # (max - min) / 15 in float32, rounded to bfloat16 once, on both sides
    # The zero: gpt-fast and torchao take min + 8 s with the float32 scale, llama-mp with the scale
    # rounded to bfloat16 first (8 significant bits, unit roundoff 2^-8: |s_bf16 - s| <= 2^-8 s, times
    # 8: s / 32); each side then rounds the zero to bfloat16 once (2^-8 of its magnitude).
    zero_bound = s.float() / 32 + 2**-8 * (z.float().abs() + z_ref.float().abs())
    assert ((z.float() - z_ref.float()).abs() <= zero_bound).all()
    # The codes: round((w - low) / s) with low = z - 8 s, from each side's own zero (the references
    # form low in bfloat16, llama-mp in float32). They may differ only where the reference's exact
    # position sits within the two lows' distance of a rounding boundary, and then by one step.
    steps = s.float().repeat_interleave(group_size, dim=1)
    low = (z.float() - 8 * s.float()).repeat_interleave(group_size, dim=1)
    low_ref = (z_ref - 8 * s_ref).float().repeat_interleave(group_size, dim=1)
    position = (F.pad(W, (0, q.size(1) - in_features))[real] - low_ref) / steps
    near_boundary = ((position - position.floor() - 0.5).abs() <= (low - low_ref).abs() / steps + 2**-16)
    differ = q != q_ref
    assert (q - q_ref).abs().max() <= 1 and not (differ & ~near_boundary).any()
    assert differ.float().mean() < 0.05, differ.float().mean()  # a boundary effect, not another scheme
    # dequantize_int4 reads the kernel's [groups, out, 2] scales-and-zeros layout as (q - 8) s + z of each group
    packed = torch.stack([s_ref, z_ref], dim=-1).transpose(0, 1).contiguous()
    expected = ((q_ref - 8).float() * s_ref.float().repeat_interleave(group_size, 1) + z_ref.float().repeat_interleave(group_size, 1))
    assert torch.equal(schemes.dequantize_int4(q_ref, packed, out_features, in_features), expected[:, :in_features])


@pytest.mark.parametrize("shape", [(64, 32), (172, 64), (3000, 172)])  # rows shorter than a block; several row blocks
def test_nf4_kernel_equals_float_reference_of_bitsandbytes_dequantization(shape):
    """The NF4 matmul dequantizes blocks of rows itself: forward and input gradient equal float32 products with
    bitsandbytes' dequantize_4bit of the same codes (float32 reordering of K <= 3000 terms: K * 2^-24 of |x| @ |W|)."""
    gen = torch.Generator().manual_seed(0)
    kernel = NF4Linear(torch.randn(shape, generator=gen))
    W = kernel.dequantize()
    x = torch.randn(2, 5, shape[1], generator=gen, requires_grad=True)
    y = kernel(x)
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    assert ((y - F.linear(x, W)).abs() <= shape[1] * 2**-24 * (x.abs() @ W.abs().t())).all()
    assert ((x.grad - grad @ W).abs() <= shape[0] * 2**-24 * (grad.abs() @ W.abs()) + 1e-30).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loaded_bytes_are_the_planner_count(world1, portable_int8, scheme):
    """What the loader holds per layer is `weight_nbytes`, the count split_model.py --plan uses (for the
    portable kernels: fbgemm's int8 layout on a CPU pads in-features to 512, `FbgemmInt8Linear.nbytes`)."""
    parsed = parse_scheme(scheme)
    for key, kernel in quantized_layers(load(scheme)).items():
        assert kernel.nbytes() == schemes.weight_nbytes(kernel.scheme, kernel.out_features, kernel.in_features, 4), key
    model = load(scheme)
    head = schemes.head_scheme(parsed)
    assert model.quantization == scheme and len(quantized_layers(model)) == N_LINEARS + (head is not None)
    assert all(model.get_submodule(k.removesuffix(".weight")).weight is None for k in quantized_layers(model))
    assert model.tok_embeddings.weight.dtype == model.norm.weight.dtype == torch.float32
    assert (model.output.weight is None and model.output.kernel.scheme == head) if head else model.output.weight.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_planner_weights_are_what_the_loader_holds(world1, portable_int8, scheme):
    """split_model.py --plan --quantize counts the loaded model's bytes exactly (TP=1)."""
    from llama.formats import plan

    model = load(scheme)
    held = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(k.nbytes() for k in quantized_layers(model).values())
    assert plan.weight_bytes(model.args, 1, 4, parse_scheme(scheme)) == held


# --- quantizing a slice vs slicing the whole tensor's quantization ------------------------------------------

def test_grouped_slices_equal_sliced_whole_tensor_quantization():
    """int4 (groups of 32) and int8 rows: quantizing a rank's slice equals slicing the whole quantization
    wherever groups align (rows always; columns at multiples of the group)."""
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q, sz = schemes.quantize_int4(W, 32, torch.bfloat16)
    q_rows, sz_rows = schemes.quantize_int4(W[32:], 32, torch.bfloat16)  # column-parallel rank 1 of 2
    assert torch.equal(q_rows, q[32:]) and torch.equal(sz_rows, sz[:, 32:])
    q_cols, sz_cols = schemes.quantize_int4(W[:, 128:], 32, torch.bfloat16)  # row-parallel rank 1 of 2
    assert torch.equal(q_cols, q[:, 128:]) and torch.equal(sz_cols, sz[4:])
    q8, s8 = schemes.quantize_int8(W, torch.bfloat16)
    q8_rows, s8_rows = schemes.quantize_int8(W[:32], torch.bfloat16)
    assert torch.equal(q8_rows, q8[:32]) and torch.equal(s8_rows, s8[:32])
    # A row-parallel int8 slice takes its scale from its own columns: never coarser than the whole row's.
    _, s8_cols = schemes.quantize_int8(W[:, :128], torch.bfloat16)
    assert (s8_cols <= s8).all() and (s8_cols < s8).any()


def test_nf4_slices_equal_sliced_whole_tensor_quantization():
    """NF4's codes and first-level absmax, blocks of 64 over the flattened tensor: a rank's slice
    equals the whole tensor's where block boundaries align (rows of 256 split in halves of 128)."""
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    codes, state = bnb_f.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    for part, (codes_part, absmax_part) in {
        "rows": (codes.view(64, 128)[32:], state.absmax.view(64, 4)[32:]),
        "cols": (codes.view(64, 128)[:, 64:], state.absmax.view(64, 4)[:, 2:]),
    }.items():
        piece = W[32:] if part == "rows" else W[:, 128:]
        piece_codes, piece_state = bnb_f.quantize_4bit(piece.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False)
        assert torch.equal(piece_codes.flatten(), codes_part.flatten()), part
        assert torch.equal(piece_state.absmax, absmax_part.flatten()), part


# --- TP=2 vs TP=1 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("quant_tp2")
    result = torchrun(2, REPO / "tests" / "quant_worker.py", "--out", out, "--schemes", ",".join(SCHEMES), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {s: [torch.load(out / f"{s}.rank{r}.pt", weights_only=False) for r in range(2)] for s in SCHEMES}


def gathered(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Full weights from the ranks' dequantized slices, joined on each weight's split dim."""
    return {key: torch.cat([r["dequantized"][key] for r in ranks], dim=layout.split_dim(key)) for key in ranks[0]["dequantized"]}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("scheme", SCHEMES)
def test_tp2_equals_tp1_built_from_the_same_dequantized_slices(world1, tp2, scheme):
    ranks = tp2[scheme]
    reference = dense_from(gathered(ranks))
    with torch.inference_mode():
        expected = reference(LOGIT_TOKENS, 0)
    got = ranks[0]["logits"]
    assert torch.equal(got, ranks[1]["logits"])  # every rank ends with the same all-reduced logits
    # int: each of the linears in series adds at most KERNEL_REL relative error (bfloat16 activations);
    # independent roundings add in quadrature, and residual/norm layers pass relative error through
    # unchanged. int8 activations (fbgemm) are a coarser rounding: each call's own relative output error
    # (measured on rank 0 against its float product with the same weight; 0.5-4% here), in quadrature,
    # x2 for a tail. nf4 (bitsandbytes dequantizes to float32 then F.linear): float32 reordering only, ~1e-6.
    activations = torch.tensor(ranks[0]["activation_errors"])  # one per call of an int8-activation kernel
    bf16_kernels = len(ranks[0]["dequantized"]) - len(activations)
    rel = math.sqrt(bf16_kernels * KERNEL_REL**2 + 4 * activations.pow(2).sum().item()) if scheme != "nf4" else 1e-5
    diff = ((got - expected).norm() / expected.norm()).item()
    assert diff <= rel, diff
    # Greedy ids (generated at TP=2), teacher-forced through the reference: equal wherever the
    # reference's top1-top2 margin exceeds 4x the logit error bound (twice the bound on each logit).
    # With int8 activations that sum over-counts: the residual stream carries each linear's error as a
    # small part of itself (bundled model: measured 0.022 against a bound of 0.24, which would leave no
    # step to check), so the check takes twice the measured logit error there.
    if len(activations):
        rel = 2 * diff
    generated = ranks[0]["greedy"][0]
    all_ids = torch.tensor([PROMPT + generated])
    with torch.inference_mode():
        logits = reference(all_ids, 0)[0, len(PROMPT) - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    checked = (top2[:, 0] - top2[:, 1]) > 4 * rel * logits.abs().max()
    assert len(generated) == GEN_LEN and checked.sum() >= 3, checked  # not vacuous: some steps are far from a tie
    assert logits.argmax(-1)[checked].tolist() == torch.tensor(generated)[checked].tolist()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_tp2_kernels_are_within_their_bounds_on_each_rank(tp2, scheme):
    """Every quantized layer of each rank (its slice: column-parallel rows, row-parallel columns) against
    F.linear with the pure scheme functions' weight of that slice, within the kernel's derived bound."""
    for rank, result in enumerate(tp2[scheme]):
        checks = result["kernel_check"]
        assert len(checks) == len(result["dequantized"]), rank
        for key, (kernel, ratio, same_weight) in checks.items():
            assert ratio <= 1 and same_weight, (rank, key, kernel, ratio)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("scheme", SCHEMES)
def test_tp2_quantization_error_is_that_of_tp1(world1, tp2, scheme):
    """Row-parallel slices (wo, w2) take their scales from their own columns (int8), are grouped from
    their own (padded) columns (int4) or re-blocked (nf4), so TP=2 is not TP=1 quantized then cut:
    its logits differ from TP=1's (bundled model: int8 0.3%, int4-g32 2.8%, int4-g128 4.3%, nf4 4.5%
    relative). What must hold: TP=2 is as far from the unquantized model as TP=1 is. Its groups are
    never coarser and only 2 of the 7 linears change, so the error stays within 1.5x of TP=1's
    (another draw of the same rounding noise)."""
    with torch.inference_mode():
        exact, tp1 = load(None)(LOGIT_TOKENS, 0), load(scheme)(LOGIT_TOKENS, 0)
    tp2_error = (tp2[scheme][0]["logits"] - exact).norm() / exact.norm()
    tp1_error = (tp1 - exact).norm() / exact.norm()
    assert tp2_error <= 1.5 * tp1_error, (tp2_error, tp1_error)


@pytest.mark.slow
@pytest.mark.dist
def test_tp2_nf4_slices_equal_bitsandbytes_quantization_of_the_slice(tp2):
    """Each rank's NF4 codes and first-level absmax equal bitsandbytes' quantize_4bit of that slice."""
    ckpt = formats.open_checkpoint(STORIES)
    for rank, result in enumerate(tp2["nf4"]):
        for key, mine in result["nf4"].items():
            piece = ckpt.read(key, rank, 2).float().contiguous()
            codes, state = bnb_f.quantize_4bit(piece, blocksize=64, quant_type="nf4", compress_statistics=True)
            absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
            assert torch.equal(mine["codes"].flatten(), codes.flatten()), key
            assert torch.equal(mine["absmax_codes"], state.absmax) and torch.equal(mine["absmax"], absmax), key


# --- quality on the bundled model -----------------------------------------------------------------------

def relative_weight_errors(model, reference_state) -> torch.Tensor:
    """|W_deq - W| / |W| (Frobenius) of every quantized linear."""
    return torch.tensor([((k.dequantize() - reference_state[key]).norm() / reference_state[key].norm()).item()
                         for key, k in quantized_layers(model).items()])


def held_out_nll(model, tokenizer) -> float:
    records = json.loads((REPO / "datasets" / "alpaca_en_demo.json").read_text())[-HELD_OUT:]
    total = count = 0
    for record in records:
        ids = torch.tensor([tokenizer.encode(record["output"], bos=True, eos=False)[:256]])
        with torch.inference_mode():
            logits = model(ids, 0)[0, :-1]
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.size(1) - 1
    return total / count


# Held-out perplexity bounds (quantized / unquantized). The bundled model (dim 64) has no redundancy
# to hide noise in, so the bounds are per scheme's weight error: int8 per-channel steps are 1/127
# of a row's range (relative rms weight error < 1%, published int8 weight-only results are lossless
# within 0.1%): 1.02. 4-bit steps are 1/15 of a group's range (or NF4's 16 levels over a block's
# absmax): relative rms weight error 5-10%, which costs Llama-2-7B ~2-4% perplexity at g128 / NF4
# (gpt-fast, QLoRA papers) and more on a model this small: g32 1.10, g128 1.15, nf4 1.20. A wrong
# slice, scale or padding column gives perplexities in the hundreds. The output head (int8 under int8
# and int4, schemes.head_scheme) keeps the same bounds: its per-row int8 error is that of the int8
# block linears (< 1% relative), one linear more, and it adds 0.5-0.6% on this model (int8 x0.996 ->
# x1.001, int4-g32 x1.067 -> x1.072, int4-g128 x1.053 -> x1.059); nf4 leaves it unquantized.
PPL_BOUND = {"int8": 1.02, "int4-g32": 1.10, "int4-g128": 1.15, "nf4": 1.20}
# Below 1 only by noise: weight rounding alone moves it by < 0.1%, but int8 activations (fbgemm, one
# scale per prompt) are noise of either sign on every linear: x0.996 for the block linears alone.
PPL_FLOOR = 0.99


@pytest.fixture(scope="module")
def unquantized(tmp_path_factory):
    from llama import distributed
    from llama.tokenizer import load_tokenizer

    distributed.setup()
    model = load(None)
    tokenizer = load_tokenizer(STORIES / "tokenizer.model")
    yield model, tokenizer, held_out_nll(model, tokenizer)
    distributed.teardown()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quality_on_the_bundled_model(unquantized, scheme):
    """Golden (llama2.c) greedy ids, teacher-forced: the quantized argmax equals the unquantized one
    wherever the unquantized top1-top2 margin exceeds tau; held-out perplexity within PPL_BOUND."""
    reference, tokenizer, reference_nll = unquantized
    model = load(scheme)
    ids = torch.tensor([GOLDEN["greedy_bos_256"]["all_ids"]])
    with torch.inference_mode():
        expected, got = reference(ids, 0)[0], model(ids, 0)[0]
    assert expected[:-1].argmax(-1).tolist() == ids[0, 1:].tolist()  # the reference follows the golden path
    # tau: to first order each linear's relative weight error eps_l moves the logits by eps_l times
    # their spread, and so does each int8-activation call's relative output error (fbgemm: measured
    # in the same forward); independent errors add in quadrature; x2 for a tail bound.
    eps = torch.cat([relative_weight_errors(model, reference.state_dict()), torch.tensor(activation_errors(model, ids))])
    spread = (expected - expected.mean(-1, keepdim=True)).pow(2).mean().sqrt()
    tau = 2 * eps.pow(2).sum().sqrt() * spread
    top2 = expected.topk(2, dim=-1).values
    checked = (top2[:, 0] - top2[:, 1]) > tau
    assert checked.sum() >= 20, (scheme, tau, checked.sum())  # the check is not vacuous
    assert torch.equal(got.argmax(-1)[checked], expected.argmax(-1)[checked]), scheme
    ratio = math.exp(held_out_nll(model, tokenizer) - reference_nll)
    assert PPL_FLOOR < ratio <= PPL_BOUND[scheme], (scheme, ratio)


# --- QLoRA ------------------------------------------------------------------------------------------------

def test_qlora_step0_forward_equals_dequantized_base_and_gradients_reach_adapters_only(world1):
    model = load("nf4", max_seq_len=64)
    reference = dense_from({key: k.dequantize() for key, k in quantized_layers(model).items()})
    lora.add_lora(model, list(lora.DEFAULT_TARGETS), r=8, alpha=16.0, seed=0)  # B = 0: the adapter adds nothing yet
    tokens = LOGIT_TOKENS
    got = model(tokens, 0)
    expected = reference(tokens, 0)
    # float32 both ways (bitsandbytes dequantizes then multiplies): reordering of K <= 172 term sums.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.float().logsumexp(-1).sum().backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained and all(".lora." in name for name in trained)
    assert all(p.grad is None for name, p in model.named_parameters() if ".lora." not in name)


QLORA = ["--method", "lora", "--quantize", "nf4", *FAST, "--template", "plain", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    ft_main.main([*QLORA, "--max_steps", "10", "--eval_interval", "10", "--out_dir", str(out)])
    return out


@pytest.mark.slow
def test_qlora_lowers_held_out_loss_and_records_the_base(qlora_run):
    records = evals(qlora_run)
    # lr 3e-3 (LoRA's default) for 10 steps lowers plain LoRA's held-out loss by ~0.3 nats on this data;
    # an NF4 base must still learn: at least a tenth of that.
    assert records[-1]["eval_loss"] < records[0]["eval_loss_untuned"] - 0.03, records
    assert adapters.load_adapter(qlora_run / "adapter.pt")[1]["base_quantization"] == "nf4"
    from safetensors import safe_open

    with safe_open(qlora_run / "peft" / "adapter_model.safetensors", "pt") as weights:
        assert weights.metadata()["base_quantization"] == "nf4"  # PEFT warns about unknown adapter_config keys


def linear4bit(kernel: NF4Linear, rows=None):
    """A bitsandbytes Linear4bit holding `kernel`'s NF4 codes and quantization state (rows reordered
    whole blocks at a time when `rows` is given: each row is one block of 64 here)."""
    import copy

    import bitsandbytes as bnb

    packed, state = kernel.packed, copy.copy(kernel.state)
    state.shape = torch.Size((kernel.out_features, kernel.in_features))
    if rows is not None:
        assert kernel.in_features == schemes.NF4_BLOCK
        packed, state.absmax = packed.view(kernel.out_features, -1)[rows].reshape(-1, 1), state.absmax[rows]
    layer = bnb.nn.Linear4bit(kernel.in_features, kernel.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.support_avx512bf16_for_cpu = False  # its AVX512-BF16 repacking needs out-features in multiples of 32 (w1: 172)
    layer.weight = bnb.nn.Params4bit(data=packed, requires_grad=False, quant_state=state, blocksize=schemes.NF4_BLOCK,
                                     compress_statistics=True, quant_type="nf4", bnb_quantized=True)
    return layer


@pytest.mark.slow
def test_peft_on_bitsandbytes_linear4bit_equals_our_qlora_forward(world1, qlora_run):
    """Our QLoRA adapter (PEFT export) on a transformers copy whose linears are bitsandbytes Linear4bit
    with the same NF4 weights: PEFT's forward equals ours."""
    peft = pytest.importorskip("peft")
    from test_lora import LOGITS_RTOL, hf_copy, hf_permute, tokens

    model = load("nf4", max_seq_len=64)
    adapters.apply_adapter(model, qlora_run / "adapter.pt")
    hf, args = hf_copy(model.args), model.args
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj"}
    for key, kernel in quantized_layers(model).items():
        _, i, ours = key.removesuffix(".weight").split(".", 2)
        rows = None
        if ours in ("attention.wq", "attention.wk"):  # HF's rotate-half row order (transformers' conversion)
            heads = args.n_heads if ours == "attention.wq" else args.kv_heads
            rows = hf_permute(torch.arange(kernel.out_features)[:, None], heads, kernel.out_features, 1).flatten()
        parent, attr = names[ours].split(".")
        setattr(hf.model.layers[int(i)].get_submodule(parent), attr, linear4bit(kernel, rows))
    peft_model = peft.PeftModel.from_pretrained(hf, qlora_run / "peft").eval()
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    ids = tokens(24)
    with torch.no_grad():
        ours, theirs = model(ids), peft_model(ids).logits
        untuned = load("nf4", max_seq_len=64)(ids)
    # Both dequantize the same codes to float32 and add float32 LoRA: test_lora.py's bound for reordered float32 ops.
    assert (ours - theirs).abs().max() < LOGITS_RTOL * theirs.abs().max()
    assert (ours - untuned).abs().max() > 0.1  # the adapter matters


@pytest.mark.slow
def test_adapter_on_a_differently_quantized_base_warns(qlora_run):
    """example_ft.py --adapter: a QLoRA adapter (trained over nf4) applied to an int8 base runs, with one warning."""
    result = python("example_ft.py", "--adapter", qlora_run / "adapter.pt", "--quantize", "int8", "--max_tokens", "4", "--json",
                    "--instruction", "Say hi.")
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the adapter was trained on a base quantized as 'nf4' and is applied to one quantized as "
                        "'int8': outputs may differ from what training saw"]
    same = python("example_ft.py", "--adapter", qlora_run / "peft", "--quantize", "nf4", "--max_tokens", "4", "--json", "--instruction", "Say hi.")
    assert same.returncode == 0 and "warning:" not in same.stderr


@pytest.mark.slow
def test_qlora_resume_continues_exactly(tmp_path):
    args = [*QLORA, "--eval_interval", "2", "--ckpt_interval", "2"]
    ft_main.main([*args, "--max_steps", "4", "--out_dir", str(tmp_path / "whole")])
    ft_main.main([*args, "--max_steps", "2", "--lr_decay_steps", "4", "--out_dir", str(tmp_path / "split")])
    ft_main.main(["--resume", "--max_steps", "4", "--out_dir", str(tmp_path / "split")])
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # fp32 CPU, same batches, NF4 base and RNG state


@pytest.mark.slow
def test_qlora_with_activation_checkpointing_repeats_the_same_steps(tmp_path):
    args = [*QLORA, "--max_steps", "2", "--eval_interval", "2"]
    ft_main.main([*args, "--out_dir", str(tmp_path / "plain")])
    ft_main.main([*args, "--checkpoint_activations", "--out_dir", str(tmp_path / "recompute")])
    assert losses(tmp_path / "recompute") == losses(tmp_path / "plain")  # recomputation repeats the same fp32 ops


@pytest.mark.slow
@pytest.mark.dist
def test_qlora_on_two_ranks_matches_one(tmp_path):
    """TP=2 re-blocks only the row-parallel slices (wo, w2), so its losses may differ from TP=1's by at
    most the whole effect of NF4 on the loss (TP=1 NF4 vs unquantized, step 0)."""
    steps = ["--max_steps", "3", "--eval_interval", "3"]
    ft_main.main([*QLORA, *steps, "--out_dir", str(tmp_path / "tp1")])
    ft_main.main(["--method", "lora", *FAST, "--template", "plain", *steps, "--max_steps", "1", "--out_dir", str(tmp_path / "plain")])
    jobs = [{"script": "ft_main", "argv": [*QLORA, *steps, "--tp", "2", "--out_dir", str(tmp_path / "tp2")]}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = torchrun(2, REPO / "tests" / "ft_worker.py", tmp_path / "jobs.json", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    nf4_effect = abs(losses(tmp_path / "tp1")[0][1] - losses(tmp_path / "plain")[0][1])
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "tp1"), losses(tmp_path / "tp2")):
        assert s1 == s2 and abs(l1 - l2) <= max(nf4_effect, 1e-4), (s1, l1, l2, nf4_effect)


# --- bad input ----------------------------------------------------------------------------------------

# Runs a script as `python script ...` would, with bitsandbytes made unimportable.
BLOCK_BNB = ("import os, sys, runpy; sys.modules['bitsandbytes'] = None; sys.argv = sys.argv[1:]; "
             "sys.path[0] = os.path.dirname(sys.argv[0]); runpy.run_path(sys.argv[0], run_name='__main__')")
BAD = {
    "unknown value": (["example.py", "--quantize", "int3"], r"unknown --quantize 'int3': choose none, int8, int4"),
    "group that is not offered": (["serve.py", "--quantize", "int4-g48"], r"unknown --quantize 'int4-g48'"),
    "full with a quantized base": (["ft_main.py", "--method", "full", "--quantize", "nf4"], r"--method full trains every weight"),
    "int8 for training": (["ft_main.py", "--method", "lora", "--quantize", "int8"], r"--quantize int8 is for inference"),
    "nf4 with --compile": (["example.py", "--quantize", "nf4", "--compile"], r"--compile does not support --quantize nf4"),
    "planning int8 training": (["split_model.py", "--plan", "--ckpt_dir", str(STORIES), "--mode", "lora", "--quantize", "int8"], r"--quantize int8 is for inference"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_clear_error(name, tmp_path):
    argv, pattern = BAD[name]
    result = in_process(*argv, *(["--out_dir", tmp_path] if argv[0] == "ft_main.py" else []))  # refused before any work
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines
    assert result.stdout == ""


@pytest.mark.slow
def test_planner_cli_counts_quantized_weights():
    """split_model.py --plan --quantize: the int4 table's weights column is the planner's quantized count."""
    from llama.formats import plan

    result = in_process("split_model.py", "--plan", "--ckpt_dir", STORIES, "--quantize", "int4-g32", "--batch_size", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "int4-g32 block linears" in result.stdout
    args = formats.open_checkpoint(STORIES).args
    row = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["2"])
    assert float(row.split()[1]) == pytest.approx(round(plan.weight_bytes(args, 2, 2, parse_scheme("int4-g32")) / plan.GiB, 2))


@pytest.mark.slow
def test_nf4_without_bitsandbytes_names_the_extra(tmp_path):
    (tmp_path / "block.py").write_text(BLOCK_BNB)
    for script in ("example.py", "example_ft.py"):
        result = python(tmp_path / "block.py", REPO / script, "--quantize", "nf4")
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == ["error: --quantize nf4 needs bitsandbytes, the optional extra 'qlora': "
                                                      "pip install -e \".[qlora]\""]


def test_parse_scheme():
    assert parse_scheme("none") is None
    assert str(parse_scheme("int4")) == "int4-g128" and parse_scheme("int4-g32").group_size == 32
    with pytest.raises(UserError, match="unknown --quantize"):
        parse_scheme("int4-g")
