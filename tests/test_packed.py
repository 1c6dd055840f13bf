"""Dense float32 linears pre-packed for a CPU GEMM library (llama/kernels/packed.py PackedLinear, --prepack).

References: the exact product (float64 of the float32 operands) with the float32 bound gamma_K S of any
summation order (packed_worker.packed_check); the checkpoint's own weights (what each kernel multiplies
by, read back through it); the same model loaded unpacked (F.linear); llama2.c's golden ids
(tests/test_golden.py, fused-onednn and fused-mkl). TP=2: tests/packed_worker.py.
"""

import gc

import pytest
import torch
from dist_utils import torchrun
from packed_worker import TOKENS, packed_check, slice_of
from references import REPO, STORIES
from test_tp import TOL

from llama import formats
from llama.config import LoadSpec
from llama.errors import UserError
from llama.formats.load import load_model
from llama.kernels import linear
from llama.kernels.packed import _PACKED, PackedLinear, packing_available
from llama.kernels.schemes import parse_scheme
from llama.parallel import ColumnParallelLinear, FusedColumnParallelLinear, RowParallelLinear

PACKINGS = [p for p in ("onednn", "mkl") if packing_available(p)]
pytestmark = pytest.mark.skipif(not PACKINGS, reason="this torch build has neither oneDNN nor MKL")


def load(pack: str, inference: bool = True, quantize=None):
    spec = LoadSpec(STORIES, max_seq_len=64, max_batch_size=2, dtype=torch.float32, prepack=pack, quantize=quantize)
    return load_model(spec, vocab_size=512, device=torch.device("cpu"), inference=inference)


def kernels(model) -> dict[str, PackedLinear]:
    return {name.removesuffix(".kernel"): m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("shape", [(50, 70), (512, 64), (64, 172)], ids=str)
def test_packed_product_is_within_float32_rounding_of_the_exact_one(packing, shape):
    """One row (MKL's packed path, batch-1 decoding) and several (MKL: F.linear on the kept weight; oneDNN:
    the same packed weight), inputs with a large row; the weight read back through the kernel is W exactly."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=gen)
    kernel = PackedLinear(W, packing)
    for rows in (1, 3, 17):
        x = torch.randn(rows, shape[1], generator=gen)
        x[-1] *= 1e3
        assert packed_check(kernel, W, x) <= 1
    assert torch.equal(kernel.unpack(), W)
    x = torch.randn(2, 5, shape[1], generator=gen)  # leading dims kept
    assert kernel(x).shape == (2, 5, shape[0])


@pytest.mark.parametrize("kind", ["onednn", "mkl", "fbgemm int8"])
def test_packed_kernels_compile_and_free_their_blob(kind):
    """Every kernel on a library's packed object (oneDNN, MKL, fbgemm's int8): under torch.compile the call
    goes through the custom op with the blob's handle (fullgraph, dynamic rows) and gives eager's result;
    dropping the kernel drops its blob from the registry."""
    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    if kind == "fbgemm int8":
        if linear.fbgemm_reduce_range() is None:
            pytest.skip("fbgemm's dynamic int8 linear is not available here")
        kernel = linear.FbgemmInt8Linear(weight, True)
    elif kind in PACKINGS:
        kernel = PackedLinear(weight, kind)
    else:
        pytest.skip(f"this torch build cannot pack for {kind}")
    compiled = torch.compile(kernel, fullgraph=True, dynamic=True, backend="eager")
    for rows in (1, 5):
        x = torch.randn(rows, 64)
        assert torch.equal(compiled(x), kernel(x))
    handle = kernel.handle
    assert handle in _PACKED
    del kernel, compiled
    gc.collect()
    assert handle not in _PACKED


@pytest.mark.parametrize("packing", PACKINGS)
def test_an_inference_load_packs_every_dense_linear_and_keeps_the_logits(world1, packing):
    """Every linear (fused or not, the output head too) holds a kernel multiplying by its checkpoint weight
    exactly and no float weight; the logits are the unpacked model's within the reordered float32 sums of
    test_tp.TOL (the products differ only in summation order, as TP=N's and TP=1's do)."""
    packed, dense = load(packing), load("none", inference=False)
    ckpt = formats.open_checkpoint(STORIES)
    layers = kernels(packed)
    linears = [n for n, m in packed.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear, FusedColumnParallelLinear))]
    assert len(layers) == 4 * packed.args.n_layers + 1 and "output" in layers, sorted(layers)
    for name in linears:
        module = packed.get_submodule(name)
        assert getattr(module, "weight", None) is None, name
    for name, kernel in layers.items():
        assert kernel.packing == packing
        assert torch.equal(kernel.unpack(), slice_of(packed, name, ckpt)), name
    with torch.inference_mode():
        torch.testing.assert_close(packed(TOKENS, 0), dense(TOKENS, 0), **TOL)


def test_auto_packs_by_thread_count_and_only_for_inference(world1):
    """auto: oneDNN for every dense linear at 2+ threads, MKL for the output head alone at 1; none packs
    nothing; a training load (inference=False) packs nothing whatever --prepack says; quantized linears keep
    their quantized kernel and only dense ones are packed."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels(load("auto"))
        torch.set_num_threads(2)
        two = kernels(load("auto"))
    finally:
        torch.set_num_threads(threads)
    if "mkl" in PACKINGS:
        assert list(one) == ["output"] and one["output"].packing == "mkl"
    if "onednn" in PACKINGS:
        assert len(two) == 21 and {k.packing for k in two.values()} == {"onednn"}
    assert not kernels(load("none")) and not kernels(load(PACKINGS[0], inference=False))
    assert not kernels(load(PACKINGS[0], quantize=parse_scheme("int8")))  # the head is int8 too: no dense linear is left
    nf4 = pytest.importorskip("bitsandbytes") and kernels(load(PACKINGS[0], quantize=parse_scheme("nf4")))
    assert list(nf4) == ["output"]  # nf4 leaves the head dense (schemes.head_scheme)


def test_a_bad_pack_is_one_clear_error():
    with pytest.raises(UserError, match="--prepack must be one of auto, none, onednn, mkl"):
        LoadSpec(STORIES, prepack="fast")


@pytest.mark.slow
@pytest.mark.dist
def test_tp2_packed_kernels_multiply_by_their_slices(tmp_path):
    """Each rank's packed kernels (column-parallel rows, row-parallel columns, its vocabulary rows of the
    head) multiply by that rank's checkpoint slice exactly and within the float32 bound; the TP=2 logits
    equal the unpacked TP=2 model's within test_tp.TOL."""
    result = torchrun(2, REPO / "tests" / "packed_worker.py", "--out", tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for packing in PACKINGS:
        for rank in range(2):
            out = torch.load(tmp_path / f"{packing}.rank{rank}.pt", weights_only=True)
            assert len(out["checks"]) == 21, (packing, rank)
            for layer, (kind, ratio, same_weight) in out["checks"].items():
                assert kind == packing and ratio <= 1 and same_weight, (packing, rank, layer, ratio)
            torch.testing.assert_close(out["logits"], out["dense_logits"], **TOL)
