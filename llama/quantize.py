"""Weight-only quantization of the seven linears of each block, one rank's slice at a time.

`--quantize` picks a scheme; only wq, wk, wv, wo, w1, w2, w3 are quantized (embeddings, output
and norms stay in the model dtype). The loader (llama.formats.load.load_model) reads each rank's
slice and hands it to `quantize_weight` before reading the next one, so a rank holds at most its
quantized slices plus one unquantized tensor; a whole tensor is never quantized and then cut.
Column-parallel slices keep whole rows, so per-row (int8) and per-group (int4) scales are the
same as the whole tensor's; a row-parallel slice (wo, w2) is quantized from its own columns.

- int8: per-output-channel symmetric scales, q = round(w / s) in [-127, 127], s = max|w_row| / 127.
  Kernel: torch._weight_int8pack_mm.
- int4: gpt-fast's grouped asymmetric scheme: per group of `group_size` in-features, s = (max -
  min) / 15, zero z = min + 8 s, q = round((w - min) / s) in [0, 15], w ~ (q - 8) s + z.
  Kernels: aten._weight_int4pack_mm_for_cpu on CPU, aten._weight_int4pack_mm on CUDA.
- nf4: QLoRA's 4-bit NormalFloat codebook, blocks of 64 with double-quantized (8-bit, block 256)
  absmax, through bitsandbytes (the optional extra `qlora`); its matmul has a backward, so QLoRA
  trains adapters over it (gradients reach the input and the LoRA factors only).

Both int kernels read activations in a 16-bit dtype (the model's, or bfloat16 for a float32
model): on CPU they are fast with bfloat16 activations and many times slower with float32 ones.
Both also need in-features in whole tiles (the int8 CPU kernel crashes on 172 or 86 columns, the
bundled model's w2), so in-features are zero-padded: int8 to a multiple of 32, int4 to a multiple
of the group size; the input is padded alike, and zero columns add nothing. The int4 CPU kernel
also needs out-features in multiples of 16 (the bundled model's w1 has 172): int4 pads rows with
zeros too and drops their outputs. So every shape runs; padding costs memory, which
`weight_nbytes` counts.
"""

import logging
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.errors import UserError
from llama.lora import TARGETS

# The linears that are quantized: the seven of each block that LoRA can target too (names without the
# "layers.N." prefix); the output layer, embeddings and norms keep the model dtype.
QUANTIZED = tuple(f"{path}.weight" for path in TARGETS.values() if path is not None)
SCHEMES = ("none", "int8", "int4", "nf4")
INT4_GROUP_SIZES = (32, 64, 128)
INT4_DEFAULT_GROUP = 128  # gpt-fast's default
INT8_ALIGN = 32  # in-features are padded to this multiple for _weight_int8pack_mm's vector tiles
INT4_OUT_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256  # QLoRA's blocks of weights and of double-quantized absmax
NF4_ROWS = 1024  # rows the NF4 matmul dequantizes at a time
CHOICES = "none, int8, int4 (= int4-g128; also int4-g32, int4-g64) or nf4"
_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")


@dataclass(frozen=True)
class Scheme:
    """A --quantize choice: `name` int8 / int4 / nf4, and the group size of int4."""

    name: str
    group_size: int = 0

    def __str__(self) -> str:
        return f"int4-g{self.group_size}" if self.name == "int4" else self.name


def parse_scheme(text: Optional[str]) -> Optional[Scheme]:
    """--quantize text -> Scheme, None for 'none'; unknown values and nf4 without bitsandbytes are UserErrors."""
    if text is None or isinstance(text, Scheme):
        return text
    if text == "none":
        return None
    int4 = re.fullmatch(r"int4(?:-g(\d+))?", str(text))
    if int4 and (int4.group(1) is None or int(int4.group(1)) in INT4_GROUP_SIZES):
        return Scheme("int4", int(int4.group(1) or INT4_DEFAULT_GROUP))
    if text in ("int8", "nf4"):
        if text == "nf4":
            require_bitsandbytes()
        return Scheme(text)
    raise UserError(f"unknown --quantize '{text}': choose {CHOICES}")


def add_option(parser) -> None:
    """--quantize, shared by example.py, example_ft.py, serve.py and ft_main.py."""
    parser.add_argument("--quantize", default="none",
                        help="weight-only quantization of the linears, each rank its own slice: none, int8, int4 (groups of 128; "
                             "int4-g32 / int4-g64 for smaller groups) or nf4 (needs the extra 'qlora'); see README 'Quantization'")


def check_training(method: str, scheme: Optional[Scheme]) -> None:
    """ft_main.py: full tuning needs float weights; adapters train over nf4 only (its matmul has a backward)."""
    if scheme is None:
        return
    if method == "full":
        raise UserError(f"--method full trains every weight, which a {scheme} base cannot hold: drop --quantize, "
                        "or train adapters over a quantized base with --method lora --quantize nf4 (QLoRA)")
    if scheme.name != "nf4":
        raise UserError(f"--quantize {scheme} is for inference (its kernel has no backward): train over a quantized base with --quantize nf4")


def check_compile(scheme: Optional[Scheme], compile: bool) -> None:
    """torch.compile traces the int kernels (aten ops) but not bitsandbytes' NF4 calls."""
    if compile and scheme is not None and scheme.name == "nf4":
        raise UserError("--compile does not support --quantize nf4 (torch.compile cannot trace bitsandbytes' calls): "
                        "drop --compile, or use --quantize int8 / int4")


def require_bitsandbytes():
    """bitsandbytes, or a UserError naming the extra that installs it.

    On AVX512-BF16 CPUs bitsandbytes 0.50 logs at import that an optional Hub kernel package is
    missing; it falls back to its own kernels, and this project downloads nothing, so that line is muted.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise UserError("--quantize nf4 needs bitsandbytes, the optional extra 'qlora': pip install -e \".[qlora]\"") from None
    return bitsandbytes


def applies(scheme: Optional[Scheme], key: str) -> bool:
    """True if `key` (a Meta weight name) is quantized under `scheme`."""
    return scheme is not None and _LAYER_PREFIX.sub("", key) in QUANTIZED


def kernel_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype of the int kernels: the model's if 16-bit, else bfloat16 (see the module doc)."""
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def padded(in_features: int, scheme: Scheme) -> int:
    """In-features after zero padding to the kernel's multiple (nf4 needs none: its blocks run over the flat tensor)."""
    return round_up(in_features, {"int8": INT8_ALIGN, "int4": scheme.group_size}.get(scheme.name, 1))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def weight_nbytes(scheme: Optional[Scheme], out_features: int, in_features: int, dtype_bytes: int) -> int:
    """Bytes one rank holds for a [out, in] slice: the one count the loader's tensors and the planner share.

    int8: 1 byte per (padded) weight + a 16-bit scale per row. int4: half a byte per weight + a
    16-bit scale and zero per group (rows padded to 16). nf4: half a byte per weight + a uint8 absmax per 64 weights +
    a float32 absmax per 256 absmax, plus bitsandbytes' tables (the 16-entry NF4 codebook, the
    256-entry code of the absmax and its offset, all float32).
    """
    if scheme is None:
        return out_features * in_features * dtype_bytes
    if scheme.name == "int8":
        return out_features * padded(in_features, scheme) + 2 * out_features
    if scheme.name == "int4":
        n, k = round_up(out_features, INT4_OUT_ALIGN), padded(in_features, scheme)
        return n * k // 2 + 2 * 2 * n * (k // scheme.group_size)
    n = out_features * in_features
    blocks = -(-n // NF4_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // NF4_SCALE_BLOCK) + 4 * (16 + 256 + 1)


# --- the schemes on one [out, in] slice (pure functions: the tests compare them with slicing) -------------

def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in_padded], scales [out] in scale_dtype): symmetric per output channel.

    The scale is rounded to its stored dtype first, so q rounds against the scale the kernel uses.
    """
    w = pad_columns(weight.float(), padded(weight.size(1), Scheme("int8")))
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int32 [out_padded, in_padded] in 0..15, scales_and_zeros [groups, out_padded, 2]): gpt-fast's scheme.

    gpt-fast's get_group_qparams / group_quantize_tensor_from_qparams, with the scale and zero
    rounded to their stored dtype before q is computed.
    """
    out_features = round_up(weight.size(0), INT4_OUT_ALIGN)
    w = F.pad(weight.float(), (0, padded(weight.size(1), Scheme("int4", group_size)) - weight.size(1), 0, out_features - weight.size(0)))
    w = w.reshape(out_features, -1, group_size)
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(scale_dtype)
    zeros = (lo + scales.float() * 8).to(scale_dtype)
    q = ((w - (zeros.float() - 8 * scales.float())) / scales.float()).round().clamp(0, 15).to(torch.int32)
    scales_and_zeros = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return q.reshape(out_features, -1), scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """float32 (q - 8) * s + z, cut to the unpadded [out_features, in_features]."""
    groups = scales_and_zeros.size(0)
    sz = scales_and_zeros.float().transpose(0, 1)  # [out, groups, 2]
    w = (q.reshape(q.size(0), groups, -1).float() - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(q.size(0), -1)[:out_features, :in_features]


def quantize_nf4(weight: torch.Tensor):
    """(packed uint8 codes, bitsandbytes QuantState): NF4, block 64, absmax double-quantized in blocks of 256.

    bitsandbytes blocks the flattened tensor either way; the state keeps the flat shape because
    bitsandbytes 0.50's CPU dequantize_4bit returns wrong values for a 2-D shape whose rows are
    shorter than a block (the bundled model's wo slices at TP=2: 32 columns), while the flat
    dequantization of the same codes is right.
    """
    return require_bitsandbytes().functional.quantize_4bit(weight.contiguous().reshape(-1), blocksize=NF4_BLOCK, compress_statistics=True,
                                                          quant_type="nf4", quant_storage=torch.uint8)


def pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dim to `width`."""
    return tensor if tensor.size(-1) == width else F.pad(tensor, (0, width - tensor.size(-1)))


# --- the local kernels: modules a parallel linear calls instead of F.linear ------------------------------

class QuantizedWeight(nn.Module):
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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return list(self.buffers())

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device


def by_rows(quantize_rows, weight: torch.Tensor, *args, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8 / quantize_int4 on blocks of `rows` rows, joined: rows quantize independently,
    and the float32 working copies then stay a block's size, not the slice's."""
    parts = [quantize_rows(weight[i : i + rows], *args) for i in range(0, weight.size(0), rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([scales for _, scales in parts], dim=-1 if parts[0][1].dim() == 1 else 1)


class Int8Weight(QuantizedWeight):
    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__()
        self.scheme, (self.out_features, self.in_features) = Scheme("int8"), weight.shape
        q, scales = by_rows(quantize_int8, weight, compute_dtype)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = pad_columns(x.reshape(-1, x.size(-1)).to(self.scales.dtype), self.q.size(1))
        return torch._weight_int8pack_mm(flat, self.q, self.scales).reshape(*x.shape[:-1], -1).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scales.float()[:, None])[:, : self.in_features]


class Int4Weight(QuantizedWeight):
    def __init__(self, weight: torch.Tensor, group_size: int, compute_dtype: torch.dtype):
        super().__init__()
        self.scheme, (self.out_features, self.in_features) = Scheme("int4", group_size), weight.shape
        q, scales_and_zeros = by_rows(quantize_int4, weight, group_size, compute_dtype, rows=1024)  # 1024: a multiple of 16
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

    def codes(self) -> torch.Tensor:
        """The int32 codes [out_padded, in_padded], unpacked by multiplying the identity (the packed layout is the kernel's own)."""
        eye = torch.eye(self.padded_in, dtype=self.scales_and_zeros.dtype, device=self.device)
        ones = torch.ones_like(self.scales_and_zeros)
        unit = torch.stack([ones[..., 0], torch.full_like(ones[..., 0], 8)], dim=-1)  # s=1, z=8: w = q exactly
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        return mm(eye, self.packed, self.scheme.group_size, unit).t().round().to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.codes(), self.scales_and_zeros, self.out_features, self.in_features)


class NF4Weight(QuantizedWeight):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.scheme, (self.out_features, self.in_features) = Scheme("nf4"), weight.shape
        self.packed, self.state = quantize_nf4(weight)

    def tensors(self) -> list[torch.Tensor]:
        state = self.state
        return [self.packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4Linear.apply(x, self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight, by bitsandbytes' dequantize_4bit (the reference the kernel's blocks are tested against)."""
        weight = require_bitsandbytes().functional.dequantize_4bit(self.packed, self.state)
        return weight.view(self.out_features, self.in_features).to(dtype)

    def absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (the double quantization undone), n / 64 numbers."""
        state = self.state
        return require_bitsandbytes().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset

    def row_blocks(self) -> list[tuple[int, int]]:
        """Row ranges of about NF4_ROWS rows, each starting on a block boundary of the flat tensor."""
        unit = NF4_BLOCK // math.gcd(self.in_features, NF4_BLOCK)
        step = max(unit, NF4_ROWS // unit * unit)
        return [(start, min(start + step, self.out_features)) for start in range(0, self.out_features, step)]

    def dequantize_rows(self, start: int, stop: int, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows start..stop of the weight, by bitsandbytes' dequantize_4bit of their codes and (already
        double-dequantized) absmax, on the flat shape (see `quantize_nf4`)."""
        bnb_f = require_bitsandbytes().functional
        lo, hi = start * self.in_features, stop * self.in_features
        rows = bnb_f.QuantState(absmax=absmax[lo // NF4_BLOCK : -(-hi // NF4_BLOCK)], shape=torch.Size([hi - lo]), code=self.state.code,
                                blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype)
        return bnb_f.dequantize_4bit(self.packed.view(-1)[lo // 2 : (hi + 1) // 2], rows).view(stop - start, self.in_features)


class NF4Linear(torch.autograd.Function):
    """x @ W^T with W dequantized block of rows by block of rows, in the forward and again in the
    backward, saving only the codes (as bitsandbytes' MatMul4Bit, which dequantizes the whole
    weight at once): the transient float copy is NF4_ROWS rows, not the weight. Only the input
    gets a gradient (the base is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: NF4Weight) -> torch.Tensor:
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


def quantize_weight(weight: torch.Tensor, scheme: Scheme, device: torch.device, dtype: torch.dtype) -> QuantizedWeight:
    """One rank's slice `weight` (read from the checkpoint) as a quantized kernel on `device`.

    The slice is first brought to `device` in the model dtype (the one unquantized tensor the
    loader holds at a time); nf4 quantizes that dtype, int8/int4 keep scales in the kernel dtype.
    """
    weight = weight.to(device=device, dtype=dtype)
    if scheme.name == "int8":
        return Int8Weight(weight, kernel_dtype(dtype))
    if scheme.name == "int4":
        return Int4Weight(weight, scheme.group_size, kernel_dtype(dtype))
    return NF4Weight(weight.contiguous())


def own(tensor: torch.Tensor, stored: torch.Tensor, scheme: Optional[Scheme]) -> torch.Tensor:
    """With a scheme, an unquantized weight that is still the `stored` view (of a memory-mapped
    checkpoint file) is copied: the file's mapping then closes when loading ends, and with it the resident pages of the
    float linears that were read to be quantized (left mapped, they count in the process's RSS).
    Without one, the weights stay mapped (zero-copy) as before."""
    if scheme is None or tensor.data_ptr() != stored.data_ptr():  # no scheme, or already a copy
        return tensor
    return tensor.clone()


def attach(model: nn.Module, quantized: dict[str, QuantizedWeight], scheme: Optional[Scheme]) -> None:
    """Give each layer named in `quantized` its kernel and drop its float weight; record the scheme on the model."""
    for key, kernel in quantized.items():
        layer = model.get_submodule(key.removesuffix(".weight"))
        layer.register_parameter("weight", None)
        layer.quant = kernel
    model.quantization = str(scheme) if scheme is not None else "none"


def quantized_layers(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Weight name -> kernel of every quantized layer of `model`."""
    return {name.removesuffix(".quant") + ".weight": m for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def adapter_mismatch(config: dict, model: nn.Module) -> Optional[str]:
    """A warning when an adapter trained over one quantization of the base is applied to another."""
    trained = config.get("base_quantization") or "none"
    here = getattr(model, "quantization", "none")
    if trained == here:
        return None
    return (f"the adapter was trained on a base quantized as '{trained}' and is applied to one quantized as '{here}': "
            "outputs may differ from what training saw")
