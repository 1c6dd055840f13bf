"""One kernel module per quantization scheme: a rank's slice of a linear in that format, and x @ W^T by it.

A parallel linear (llama/parallel.py) whose weight was quantized while loading holds one of these as
its `kernel` and no float weight; `kernel(x)` returns x @ W_local^T in x's dtype, so a row-parallel
layer's partial output is already scaled by its own slice's scales when it is all-reduced.

- `Int8Linear`: torch._weight_int8pack_mm (per-row scales, 16-bit activations).
- `Int4Linear`: aten._weight_int4pack_mm_for_cpu on CPU, aten._weight_int4pack_mm on CUDA.
- `NF4Linear`: codes dequantized by bitsandbytes, NF4_ROWS rows at a time, in forward and again in
  backward (`NF4MatMul`), so QLoRA trains adapters over it; the transient float copy is a block of
  rows, not the weight.

The formats themselves (quantize, dequantize, padding, sizes) are llama/kernels/schemes.py. The int
kernels read activations in a 16-bit dtype (`schemes.kernel_dtype`) and in-features padded to
their tiles; the input is padded alike, and zero columns add nothing.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama.kernels import schemes
from llama.kernels.schemes import Scheme, pad_columns

NF4_ROWS = 1024  # rows the NF4 matmul dequantizes at a time


class QuantizedLinear(nn.Module):
    """One rank's quantized slice of a linear; `forward(x)` is x @ W_local^T in x's dtype.

    Tensors are non-persistent buffers: they follow `.to()` but stay out of `state_dict`, whose
    keys remain the checkpoint's.
    """

    scheme: Scheme
    in_features: int
    out_features: int

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] weight the kernel multiplies by (a reference for tests)."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        return list(self.buffers())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device


class Int8Linear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__()
        self.scheme, (self.out_features, self.in_features) = Scheme("int8"), weight.shape
        q, scales = schemes.by_rows(schemes.quantize_int8, weight, compute_dtype)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = pad_columns(x.reshape(-1, x.size(-1)).to(self.scales.dtype), self.q.size(1))
        return torch._weight_int8pack_mm(flat, self.q, self.scales).reshape(*x.shape[:-1], -1).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return schemes.dequantize_int8(self.q, self.scales, self.in_features)


class Int4Linear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, group_size: int, compute_dtype: torch.dtype):
        super().__init__()
        self.scheme, (self.out_features, self.in_features) = Scheme("int4", group_size), weight.shape
        q, scales_and_zeros = schemes.by_rows(schemes.quantize_int4, weight, group_size, compute_dtype, rows=1024)  # a multiple of 16
        self.padded_in = q.size(1)
        if weight.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        else:  # CUDA takes two codes per byte, high nibble first
            tiles = next(t for t in (8, 4, 2) if q.size(1) % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = pad_columns(x.reshape(-1, x.size(-1)).to(self.scales_and_zeros.dtype), self.padded_in)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if flat.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        out = mm(flat, self.packed, self.scheme.group_size, self.scales_and_zeros)[:, : self.out_features]
        return out.reshape(*x.shape[:-1], -1).to(x.dtype).contiguous()

    def dequantize(self) -> torch.Tensor:
        """W from the packed codes as the kernel reads them: the kernel applied to the identity
        with scale 1 and zero 8 returns each code exactly, then the stored scales and zeros."""
        eye = torch.eye(self.padded_in, dtype=self.scales_and_zeros.dtype, device=self.device)
        unit = torch.stack([torch.ones_like(self.scales_and_zeros[..., 0]), torch.full_like(self.scales_and_zeros[..., 0], 8)], dim=-1)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        codes = mm(eye, self.packed, self.scheme.group_size, unit).t().round().to(torch.int32)
        return schemes.dequantize_int4(codes, self.scales_and_zeros, self.out_features, self.in_features)


class NF4Linear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.scheme, (self.out_features, self.in_features) = Scheme("nf4"), weight.shape
        self.packed, self.state = schemes.quantize_nf4(weight)

    def tensors(self) -> list[torch.Tensor]:
        state = self.state
        return [self.packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4MatMul.apply(x, self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight, by bitsandbytes' dequantize_4bit (the reference the kernel's blocks are tested against)."""
        weight = schemes.bitsandbytes().functional.dequantize_4bit(self.packed, self.state)
        return weight.view(self.out_features, self.in_features).to(dtype)

    def absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (the double quantization undone), n / 64 numbers."""
        state = self.state
        return schemes.bitsandbytes().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset

    def row_blocks(self) -> list[tuple[int, int]]:
        """Row ranges of about NF4_ROWS rows, each starting on a block boundary of the flat tensor."""
        unit = schemes.NF4_BLOCK // math.gcd(self.in_features, schemes.NF4_BLOCK)
        step = max(unit, NF4_ROWS // unit * unit)
        return [(start, min(start + step, self.out_features)) for start in range(0, self.out_features, step)]

    def dequantize_rows(self, start: int, stop: int, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows start..stop of the weight, by bitsandbytes' dequantize_4bit of their codes and (already
        double-dequantized) absmax, on the flat shape (see `schemes.quantize_nf4`)."""
        bnb_f = schemes.bitsandbytes().functional
        lo, hi, block = start * self.in_features, stop * self.in_features, schemes.NF4_BLOCK
        rows = bnb_f.QuantState(absmax=absmax[lo // block : -(-hi // block)], shape=torch.Size([hi - lo]), code=self.state.code,
                                blocksize=block, quant_type="nf4", dtype=dtype)
        return bnb_f.dequantize_4bit(self.packed.view(-1)[lo // 2 : (hi + 1) // 2], rows).view(stop - start, self.in_features)


class NF4MatMul(torch.autograd.Function):
    """x @ W^T with W dequantized block of rows by block of rows, in the forward and again in the
    backward, saving only the codes (as bitsandbytes' MatMul4Bit, which dequantizes the whole
    weight at once). Only the input gets a gradient (the base is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: NF4Linear) -> torch.Tensor:
        ctx.kernel = kernel
        absmax = kernel.absmax()
        out = x.new_empty(*x.shape[:-1], kernel.out_features)
        for start, stop in kernel.row_blocks():
            out[..., start:stop] = F.linear(x, kernel.dequantize_rows(start, stop, absmax, x.dtype))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kernel = ctx.kernel
        absmax, grad_x = kernel.absmax(), None
        for start, stop in kernel.row_blocks():
            part = grad[..., start:stop] @ kernel.dequantize_rows(start, stop, absmax, grad.dtype)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None


def quantized_linear(weight: torch.Tensor, scheme: Scheme, device: torch.device, dtype: torch.dtype) -> QuantizedLinear:
    """One rank's slice `weight` (read from the checkpoint) as a quantized kernel on `device`.

    The slice is first brought to `device` in the model dtype (the one unquantized tensor the
    loader holds at a time); nf4 quantizes that dtype, int8/int4 keep scales in the kernel dtype.
    """
    weight = weight.to(device=device, dtype=dtype)
    if scheme.name == "int8":
        return Int8Linear(weight, schemes.kernel_dtype(dtype))
    if scheme.name == "int4":
        return Int4Linear(weight, scheme.group_size, schemes.kernel_dtype(dtype))
    return NF4Linear(weight.contiguous())
