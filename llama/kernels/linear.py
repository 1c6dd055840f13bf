"""One kernel module per form of a linear's weight: a rank's slice in that form, and x @ W^T by it.

A parallel linear (llama/parallel.py) whose weight was quantized, or packed for a CPU GEMM library,
while loading holds one of these as its `kernel` and no float weight; `kernel(x)` returns x @ W_local^T
in x's dtype, so a row-parallel layer's partial output is already scaled by its own slice's scales
when it is all-reduced. `linear_kernel` is the one place that picks the kernel, per scheme, device,
CPU and thread count, when the weight is loaded:

- float32 on CPU, inference loads: `PackedLinear` (llama/kernels/packed.py), the dense weight re-packed
  for oneDNN or MKL (--prepack; at 2+ threads oneDNN's GEMM splits a one-row product over the threads,
  MKL's sgemv that F.linear calls does not; at 1 thread MKL's packed GEMM reads the weight 1.7x faster
  than its sgemv).

- int8 on CPU: `FbgemmInt8Linear`, fbgemm's dynamic int8 linear (`quantized.linear_prepack` of the
  per-channel int8 codes and scales, `quantized.linear_dynamic`), when `fbgemm_reduce_range()`'s
  probe finds it on this build and CPU: its u8 x s8 integer products run 1.6-1.8x faster than
  `_weight_int8pack_mm` at batch 1 and 3.5x at batch 8 on AVX2 (bench/decode.py, bench/RESULTS.md).
- int8 on CUDA, and on CPU where the fbgemm prepack is missing: `Int8Linear`,
  torch._weight_int8pack_mm (per-row scales, 16-bit activations).
- int4: `Int4Linear`, aten._weight_int4pack_mm_for_cpu on CPU, aten._weight_int4pack_mm on CUDA.
  On CPU it is the only int4 op that works in torch 2.13 / torchao 0.18: torchao's int8-activation
  x int4-weight kernels (da8w4, the intx "opaque" packings) need CPU extensions its wheel does not
  ship, its other int4 CPU layout is this same op behind a tensor subclass, `_dyn_quant_matmul_4bit`
  is KleidiAI on Arm and a slow reference elsewhere, and fbgemm's 4-bit embedding bags group along
  the wrong dim (perplexity x1.33 on the bundled model). It converts every weight to float before
  its FMA, so on AVX2 int4 saves memory but decodes no faster than int8.
- nf4: `NF4Linear`, codes dequantized by bitsandbytes, NF4_ROWS rows at a time, in forward and again
  in backward (`NF4MatMul`), so QLoRA trains adapters over it; the transient float copy is a block
  of rows, not the weight.

**fbgemm's activations are int8 too, one scale per call.** `linear_dynamic` quantizes its whole
input x [rows, in] with one asymmetric scale, s_x = (max(x, 0) - min(x, 0)) / qmax, qmax = 127 with
`reduce_range` (7 bits) or 255, then multiplies integers and rescales by s_x * s_w[row]. So:
- each input element is off by at most s_x / 2, and an output by at most (s_x / 2) * sum_k |W[n, k]|
  (plus float32 rescaling): about 1-2% of |y| for inputs without outliers; a few outlier channels
  (real 7B-class models have them) stretch s_x for every element, and then the error reaches
  6-19% of |y| on random data with 30x outliers (llama.cpp's q8_0 takes a scale per 32 values);
- a row's result depends on the other rows of the call: decoding is not batch-invariant (a prompt's
  ids may differ alone and in a served batch), and a prompt's prefill shares one scale over all its
  tokens;
- `reduce_range`: without VNNI, fbgemm adds pairs of u8 x s8 products in int16, and 2 * 255 * 127
  saturates it (one call gives 4111.9 for 8128); 7-bit activations (2 * 127 * 127 < 2^15) do not.
  `fbgemm_reduce_range` runs that call once per process and keeps 8 bits only where it comes out right
  (a VNNI CPU adds in int32).
The weight codes and scales are this project's (`schemes.quantize_int8` with float32 scales), so the
weight is the same per-row int8 one `Int8Linear` multiplies by.

torch.compile cannot trace fbgemm's packed weight (a TorchBind object), so under compile the call
goes through a custom op (`llama::packed_linear`) that takes an integer handle to it
(llama/kernels/packed.py `Packed`); eager calls fbgemm directly (the custom op's dispatch costs a few
microseconds a call).

The formats themselves (quantize, dequantize, padding, sizes) are llama/kernels/schemes.py. The
other int kernels read activations in a 16-bit dtype (`schemes.kernel_dtype`) and in-features
padded to their tiles; the input is padded alike, and zero columns add nothing.
"""

import functools
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.kernels import schemes
from llama.kernels.packed import Packed, PackedLinear, choose_packing
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
    scale_dtype: torch.dtype
    """The dtype its scales were rounded to before the codes were made (what `dequantize` multiplies by)."""

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
        self.scheme, (self.out_features, self.in_features), self.scale_dtype = Scheme("int8"), weight.shape, compute_dtype
        q, scales = schemes.by_rows(schemes.quantize_int8, weight, compute_dtype)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = pad_columns(x.reshape(-1, x.size(-1)).to(self.scales.dtype), self.q.size(1))
        return torch._weight_int8pack_mm(flat, self.q, self.scales).reshape(*x.shape[:-1], -1).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return schemes.dequantize_int8(self.q, self.scales, self.in_features)


# the overload itself (its packet checks every call's arguments for script objects); None in builds without it
FBGEMM_LINEAR = getattr(getattr(torch.ops.quantized, "linear_dynamic", None), "default", None)
FBGEMM_K_BLOCK = 512  # fbgemm's PackBMatrix pads in-features to its KCB (512 for int8 on AVX2 and AVX-512)


def fbgemm_prepack(q: torch.Tensor, scales: torch.Tensor) -> torch.ScriptObject:
    """fbgemm's packed weight of int8 codes q [out, in] with per-row scales (a per-channel qint8
    tensor is the only way in; torch 2.13 warns that such tensors are deprecated)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        weight = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(q.size(0), dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(weight, None)


@functools.cache
def fbgemm_reduce_range() -> Optional[bool]:
    """How fbgemm's dynamic int8 linear must run on this CPU: True (7-bit activations), False (8 bits:
    no int16 saturation here), or None where it is unavailable or wrong (then int8 takes `Int8Linear`).

    One call decides: every code 127, scale 1, x = 1 gives 64 * 127 = 8128 exactly, unless the pairs
    of u8 x s8 products saturate int16 (AVX2 without VNNI: 4111.9).
    """
    expected = 64 * 127.0
    try:
        packed = fbgemm_prepack(torch.full((16, 64), 127, dtype=torch.int8), torch.ones(16))
        x = torch.ones(1, 64)
        seven_bits, eight_bits = (FBGEMM_LINEAR(x, packed, reduce_range) for reduce_range in (True, False))
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        return None
    if not torch.allclose(seven_bits, torch.full_like(seven_bits, expected), rtol=1e-5):
        return None
    return not torch.allclose(eight_bits, torch.full_like(eight_bits, expected), rtol=1e-5)


class FbgemmInt8Linear(Packed, QuantizedLinear):
    """Per-row int8 weights in fbgemm's packed layout, times int8 activations quantized per call
    (see the module doc); float32 arithmetic around the integer product, any in/out features."""

    def __init__(self, weight: torch.Tensor, reduce_range: bool):
        super().__init__()
        self.scheme, (self.out_features, self.in_features), self.scale_dtype = Scheme("int8"), weight.shape, torch.float32
        self.reduce_range = reduce_range
        q, scales = schemes.by_rows(schemes.quantize_int8, weight, torch.float32)
        self.packed = packed = fbgemm_prepack(q[:, : self.in_features].contiguous(), scales)
        self.keep(lambda x: FBGEMM_LINEAR(x, packed, reduce_range))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = self.matmul(flat if flat.dtype == torch.float32 else flat.float())
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return weight.int_repr().float() * weight.q_per_channel_scales().float()[:, None]

    def nbytes(self) -> int:
        """What fbgemm holds (its own allocation, measured by RSS): the codes with in-features padded to
        its K block, and a 4-byte column offset, scale and zero point per row."""
        return self.out_features * schemes.round_up(self.in_features, FBGEMM_K_BLOCK) + 12 * self.out_features

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


INT4_MM_CPU, INT4_MM_CUDA = torch.ops.aten._weight_int4pack_mm_for_cpu.default, torch.ops.aten._weight_int4pack_mm.default


class Int4Linear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, group_size: int, compute_dtype: torch.dtype):
        super().__init__()
        self.scheme, (self.out_features, self.in_features), self.scale_dtype = Scheme("int4", group_size), weight.shape, compute_dtype
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
        mm = INT4_MM_CPU if flat.device.type == "cpu" else INT4_MM_CUDA
        out = mm(flat, self.packed, self.scheme.group_size, self.scales_and_zeros)
        if out.size(1) != self.out_features:  # padded rows
            out = out[:, : self.out_features].contiguous()
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """W from the packed codes as the kernel reads them: the kernel applied to the identity
        with scale 1 and zero 8 returns each code exactly, then the stored scales and zeros."""
        eye = torch.eye(self.padded_in, dtype=self.scales_and_zeros.dtype, device=self.device)
        unit = torch.stack([torch.ones_like(self.scales_and_zeros[..., 0]), torch.full_like(self.scales_and_zeros[..., 0], 8)], dim=-1)
        mm = INT4_MM_CPU if self.device.type == "cpu" else INT4_MM_CUDA
        codes = mm(eye, self.packed, self.scheme.group_size, unit).t().round().to(torch.int32)
        return schemes.dequantize_int4(codes, self.scales_and_zeros, self.out_features, self.in_features)


class NF4Linear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.scheme, (self.out_features, self.in_features), self.scale_dtype = Scheme("nf4"), weight.shape, torch.float32
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


def linear_kernel(name: str, weight: torch.Tensor, scheme: Optional[Scheme], device: torch.device, dtype: torch.dtype, *,
                  packing: str = "none") -> Optional[nn.Module]:
    """The kernel of one rank's slice `weight` of linear `name` (read from the checkpoint), or None: F.linear on
    the weight itself. The one place that picks a linear's kernel:
    - `scheme`: the quantized kernel for it on `device` (module doc; int8 on CPU: fbgemm where its probe
      passes, else _weight_int8pack_mm). The slice is first brought to `device` in the model dtype (the one
      unquantized tensor the loader holds at a time); nf4 quantizes that dtype, int8/int4 keep scales in
      the kernel dtype.
    - no scheme, a float32 weight on a CPU and an inference `packing` (--prepack): `PackedLinear` by the
      library `choose_packing` picks for this linear at this process's thread count.
    """
    if scheme is None:
        if packing == "none" or torch.device(device).type != "cpu" or dtype != torch.float32:
            return None
        library = choose_packing(packing, name, torch.get_num_threads())
        return None if library is None else PackedLinear(weight.to(dtype=dtype), library)
    weight = weight.to(device=device, dtype=dtype)
    if scheme.name == "int8" and weight.device.type == "cpu" and fbgemm_reduce_range() is not None:
        return FbgemmInt8Linear(weight, fbgemm_reduce_range())
    if scheme.name == "int8":
        return Int8Linear(weight, schemes.kernel_dtype(dtype))
    if scheme.name == "int4":
        return Int4Linear(weight, scheme.group_size, schemes.kernel_dtype(dtype))
    return NF4Linear(weight.contiguous())
