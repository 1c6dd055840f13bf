"""Kernels on a GEMM library's own packed copy of a weight, and the float32 one among them (`PackedLinear`).

A weight packed by fbgemm (int8: llama/kernels/linear.py `FbgemmInt8Linear`), oneDNN or MKL lives in an object
torch.compile cannot trace (a TorchBind object, an opaque tensor, a raw buffer). Such a kernel (`Packed`)
keeps its product in one registry under an integer handle, and compiled code reaches it through one custom
op, `llama::packed_linear`; eager code calls the product directly.

`PackedLinear` is the dense float32 kernel of --prepack: on a CPU, at one row a token, F.linear is MKL's
sgemv, which runs on one core and reads a weight slower than MKL's packed GEMM; oneDNN's packed GEMM splits a
row's product over the threads. `llama.kernels.linear.linear_kernel` decides when (`choose_packing`).
"""

import functools
import itertools
import weakref
from typing import Callable, Optional

import torch
from torch import nn

# Products by weights that live in a library's own packed object (fbgemm's TorchBind object, oneDNN's
# opaque tensor, MKL's packed buffer), which torch.compile cannot trace: each such kernel keeps its
# product `x [rows, in] -> [rows, out]` here under an integer handle (the entry goes with the kernel),
# and compiled code reaches it through the custom op `llama::packed_linear`.
_PACKED: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
_handles = itertools.count()


@torch.library.custom_op("llama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """The packed product `handle` names, on x [rows, in]: what torch.compile sees of such a kernel."""
    return _PACKED[handle](x)


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.size(0), out_features)


class Packed:
    """A kernel whose product runs on a packed object: `keep(product)` registers it, `matmul(x)` calls it
    (through the custom op while compiling; directly in eager, where the op's dispatch would cost a few
    microseconds a call). The product must not hold the kernel itself, or it would never be freed."""

    out_features: int

    def keep(self, product: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.product, self.handle = product, next(_handles)
        _PACKED[self.handle] = product
        weakref.finalize(self, _PACKED.pop, self.handle, None)

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(flat, self.handle, self.out_features)
        return self.product(flat)



PACKINGS = ("auto", "none", "onednn", "mkl")
"""--prepack: how an inference load multiplies by the dense float32 linears on a CPU (`PackedLinear`)."""


class PackedLinear(Packed, nn.Module):
    """One rank's dense float32 slice [out, in], pre-packed for a CPU GEMM library at load (inference only:
    nothing here has a gradient). `forward(x)` is x @ W^T within float32 rounding, any rows.

    - "onednn": `mkldnn._reorder_linear_weight(W, 1)`, oneDNN's blocked layout for one-row products (an
      opaque tensor the same size as W, which it replaces), multiplied by `mkldnn._linear_pointwise` for
      any row count. Its GEMM splits one row's product over the threads, where F.linear's (MKL's sgemv
      at one row) stays on one core: 110M decode at 2 threads, 1.4-1.5x F.linear's tokens/s.
    - "mkl": `mkl._mkl_reorder_linear_weight(W, 1)`, MKL's cblas_sgemm_pack of W for one-row products,
      by `mkl._mkl_linear`, which takes it when x has exactly one row (batch-1 decoding) and F.linear on
      W, which it keeps, otherwise (prefill, batches): 1.7x F.linear's GB/s on the 110M head at 1
      thread, for twice W's memory (the blob is allocated 1.1-2.3x W's size, about 1x of it touched).
    (bench/fp32_packed.py, bench/RESULTS.md.)
    """

    def __init__(self, weight: torch.Tensor, packing: str):
        super().__init__()
        self.packing, (self.out_features, self.in_features) = packing, weight.shape
        weight = weight.contiguous()
        if packing == "onednn":
            blob = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            self.keep(lambda x: torch.ops.mkldnn._linear_pointwise(x, blob, None, "none", [], ""))
        else:  # its own copy of W: not a view of the checkpoint's mapped file
            weight = weight.clone()
            blob = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
            self.keep(lambda x: torch.ops.mkl._mkl_linear(x, blob, weight, None, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def unpack(self) -> torch.Tensor:
        """W as the kernel multiplies by it: its product with the identity (one nonzero term per sum: exact)."""
        return self(torch.eye(self.in_features)).t().contiguous()


@functools.cache
def packing_available(packing: str) -> bool:
    """Whether this build runs `packing` (oneDNN: x86 and Arm builds; MKL: x86 builds): one small product."""
    try:
        weight = torch.ones(4, 8)
        return torch.equal(PackedLinear(weight, packing)(torch.ones(1, 8)), torch.full((1, 4), 8.0))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def choose_packing(packing: str, name: str, threads: int) -> Optional[str]:
    """The library that packs the dense linear `name` under --prepack `packing` at `threads` CPU threads, or None.

    "auto": every dense linear by oneDNN at 2+ threads (no memory added); at 1 thread, the output head
    (the largest matrix, read in full every token) by MKL, for one more copy of the head.
    """
    if packing == "auto":
        packing = "onednn" if threads > 1 else ("mkl" if name == "output" else "none")
    return packing if packing != "none" and packing_available(packing) else None
