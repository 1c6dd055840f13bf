"""Fused projections for inference (llama/parallel.py FusedColumnParallelLinear, built by llama.formats.load
with inference=True, as Llama.build loads): wq|wk|wv and w1|w3 each one product.

References: the same checkpoint loaded with separate layers. Dense fusion only changes the summation
order of each product (bounded below), shares the parts' memory and keeps the state dict; quantized
fusion stacks rows whose codes and scales are each row's own, so the kernel is the parts' kernels
stacked and, with the same input, gives their outputs bit for bit (int8 activations: the same x gives
the same per-call scale; the integer sums are exact; int4: each output is its own row's dot product).
LoRA adapters put on the parts after fusing add to their own share. Golden ids with fusion:
tests/test_golden.py (fused and separate), tests/test_generation.py (Llama.build), tests/test_tp.py (TP=2, 4).
"""

import pytest
import torch
from references import STORIES

from llama import lora
from llama.config import LoadSpec
from llama.formats.load import load_model
from llama.kernels.linear import QuantizedLinear
from llama.kernels.packed import packing_available
from llama.kernels.schemes import parse_scheme
from llama.parallel import FusedColumnParallelLinear

TOKENS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
U32 = 2**-24


def load(scheme=None, fuse=False, pack="none"):
    """Fused: an inference load, its dense linears unpacked unless `pack` says otherwise (test_packed.py)."""
    spec = LoadSpec(STORIES, max_seq_len=64, max_batch_size=2, dtype=torch.float32, quantize=parse_scheme(scheme or "none"), prepack=pack)
    return load_model(spec, vocab_size=512, device=torch.device("cpu"), inference=fuse)


def groups(model):
    """(fused module, its parts) of every block."""
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        yield attn.wqkv, (attn.wq, attn.wk, attn.wv)
        yield ffn.w13, (ffn.w1, ffn.w3)


def test_dense_fusion_shares_the_parts_memory_and_keeps_the_state_dict(world1):
    separate, fused = load(), load(fuse=True)
    for module, parts in groups(fused):
        assert isinstance(module, FusedColumnParallelLinear) and module.sizes == [p.weight.size(0) for p in parts]
        offset = 0
        for part in parts:  # each part's weight is a view of its rows of the stack: no memory added
            assert part.weight.untyped_storage().data_ptr() == module.weight.untyped_storage().data_ptr()
            assert torch.equal(part.weight, module.weight[offset : offset + part.weight.size(0)])
            offset += part.weight.size(0)
    expected, got = separate.state_dict(), fused.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_fused_projections_equal_separate_ones_within_summation_order(world1):
    """float32: a product over K inputs is within gamma_K S of the exact one (S = |x| @ |W|^T, gamma_K =
    K u / (1 - K u)) whatever the order of its sums, so the fused and the separate products, each such a
    product, differ by at most 2 gamma_K S."""
    model = load(fuse=True)
    x = torch.randn(3, 5, model.args.dim, generator=torch.Generator().manual_seed(1))
    K = model.args.dim
    gamma = K * U32 / (1 - K * U32)
    with torch.inference_mode():
        for module, parts in groups(model):
            for got, part in zip(module(x, parts), parts):
                expected = part(x)
                bound = 2 * gamma * (x.abs() @ part.weight.abs().t())
                assert got.shape == expected.shape and ((got - expected).abs() <= bound).all()


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g128"])
def test_quantized_fusion_is_the_parts_kernels_stacked(world1, scheme):
    """The fused kernel multiplies by the parts' dequantized weights stacked, exactly; the parts keep
    neither weight nor kernel; the model's logits are the separate model's bit for bit."""
    separate, fused = load(scheme), load(scheme, fuse=True)
    for (module, parts), (_, separate_parts) in zip(groups(fused), groups(separate)):
        assert isinstance(module.kernel, QuantizedLinear) and all(p.weight is None and p.kernel is None for p in parts)
        stacked = torch.cat([p.kernel.dequantize() for p in separate_parts])
        assert torch.equal(module.kernel.dequantize(), stacked)
    with torch.inference_mode():
        assert torch.equal(fused(TOKENS, 0), separate(TOKENS, 0))


@pytest.mark.parametrize("scheme,pack", [(None, "none"), (None, "onednn"), (None, "mkl"), ("int8", "none"), ("int4-g128", "none")])
def test_lora_put_on_fused_parts_adds_to_each_part(world1, scheme, pack):
    """Adapters on wq, wv (fused with wk) and w3 (fused with w1), plus wo (not fused), attached after
    loading: the fused model equals the separate one with the same adapters (quantized: bit for bit;
    float32, packed or not: only the summation order of the products differs, so test_tp.py's tolerance
    for reordered float32 sums, 1e-5 + 1e-5 |logit|); switched off, the adapters leave the fused base."""
    if pack != "none" and not packing_available(pack):
        pytest.skip(f"this torch build cannot pack for {pack}")
    models = [load(scheme), load(scheme, fuse=True, pack=pack)]
    for model in models:
        lora.add_lora(model, ["wq", "wv", "w3", "wo"], r=4, alpha=8.0, seed=0)
        gen = torch.Generator().manual_seed(1)
        for _, adapter in sorted(lora.adapters(model).items()):
            adapter.B.data = torch.randn(adapter.B.shape, generator=gen)  # B = 0 would add nothing
    with torch.inference_mode():
        separate, fused = (m(TOKENS, 0) for m in models)
        lora.set_enabled(models[1], False)
        base = models[1](TOKENS, 0)
    assert (fused - base).abs().max() > 1  # the adapters matter
    if scheme is None:
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(fused, separate)
    with torch.inference_mode():
        assert torch.equal(base, load(scheme, fuse=True, pack=pack)(TOKENS, 0))


def test_a_fused_model_refuses_to_train(world1):
    model = load(fuse=True).train()
    with pytest.raises(RuntimeError, match="for inference"):
        model(TOKENS, 0)
