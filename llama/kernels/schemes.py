"""Weight-only quantization schemes as pure functions on one rank's [out, in] slice.

`--quantize` picks a scheme (parsed once into a `Scheme`); the loader quantizes the linears of
each block, each rank its own slice as soon as it is read (llama/formats/load.py), so a whole
tensor is never quantized and then cut. Column-parallel slices keep whole rows, so per-row (int8)
and per-group (int4) scales are the same as the whole tensor's; a row-parallel slice (wo, w2) is
quantized from its own columns.

- int8: per-output-channel symmetric scales, q = round(w / s) in [-127, 127], s = max|w_row| / 127.
- int4: gpt-fast's grouped asymmetric scheme: per group of `group_size` in-features, s = (max -
  min) / 15, zero z = min + 8 s, q = round((w - min) / s) in [0, 15], w ~ (q - 8) s + z.
- nf4: QLoRA's 4-bit NormalFloat codebook, blocks of 64 with double-quantized (8-bit, block 256)
  absmax, through bitsandbytes (the optional extra `qlora`).

The int kernels (llama/kernels/linear.py) need in-features in whole tiles (the int8 CPU kernel
crashes on 172 or 86 columns, the bundled model's w2), so in-features are zero-padded: int8 to a
multiple of 32, int4 to a multiple of the group size; the int4 CPU kernel also needs out-features
in multiples of 16, so int4 pads rows too. Padding costs memory, which `weight_nbytes` counts.
"""

import importlib.util
import logging
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llama.errors import UserError

SCHEMES = ("none", "int8", "int4", "nf4")
INT4_GROUP_SIZES = (32, 64, 128)
INT4_DEFAULT_GROUP = 128  # gpt-fast's default
INT8_ALIGN = 32  # in-features are padded to this multiple for _weight_int8pack_mm's vector tiles
INT4_OUT_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256  # QLoRA's blocks of weights and of double-quantized absmax
CHOICES = "none, int8, int4 (= int4-g128; also int4-g32, int4-g64) or nf4"
NF4_EXTRA = "--quantize nf4 needs bitsandbytes, the optional extra 'qlora': pip install -e \".[qlora]\""


@dataclass(frozen=True)
class Scheme:
    """A --quantize choice: `name` int8 / int4 / nf4, and the group size of int4."""

    name: str
    group_size: int = 0

    def __str__(self) -> str:
        return f"int4-g{self.group_size}" if self.name == "int4" else self.name


def parse_scheme(text: str) -> Optional[Scheme]:
    """--quantize text -> Scheme, None for 'none'; unknown values, and nf4 without bitsandbytes
    installed, are UserErrors (found without importing it)."""
    if text == "none":
        return None
    int4 = re.fullmatch(r"int4(?:-g(\d+))?", text)
    if int4 and (int4.group(1) is None or int(int4.group(1)) in INT4_GROUP_SIZES):
        return Scheme("int4", int(int4.group(1) or INT4_DEFAULT_GROUP))
    if text == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(NF4_EXTRA)
    if text in ("int8", "nf4"):
        return Scheme(text)
    raise UserError(f"unknown --quantize '{text}': choose {CHOICES}")


def scheme_name(scheme: Optional[Scheme]) -> str:
    """The --quantize spelling of a scheme ('none' for None): what files and configs record."""
    return "none" if scheme is None else str(scheme)


def head_scheme(scheme: Scheme) -> Optional[Scheme]:
    """The output head's scheme under --quantize `scheme` (None: it keeps the model dtype).

    Per layer, as llama.cpp does (its q4_0 files keep the head at q6_K, its q8_0 at q8_0): the head
    is the largest single matrix of a small model (32000 x 768 is a fifth of a 110M model's bytes
    at int8) and is read whole every token, but it maps straight to the logits, so it takes int8
    under int8 and int4. nf4 is QLoRA's scheme, which leaves the head in the model dtype (it trains
    adapters over a frozen base, the head included as an optional target).
    """
    return Scheme("int8") if scheme.name in ("int8", "int4") else None


def bitsandbytes():
    """The bitsandbytes package, imported when an nf4 weight is made or read.

    On AVX512-BF16 CPUs bitsandbytes 0.50 logs at import that an optional Hub kernel package is
    missing; it falls back to its own kernels, and this project downloads nothing, so that line is muted.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise UserError(NF4_EXTRA) from None
    return bitsandbytes


def kernel_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype of the int kernels: the model's if 16-bit, else bfloat16 (on CPU these
    kernels are fast with bfloat16 activations and many times slower with float32 ones)."""
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded(in_features: int, scheme: Scheme) -> int:
    """In-features after zero padding to the kernel's multiple (nf4 needs none: its blocks run over the flat tensor)."""
    return round_up(in_features, {"int8": INT8_ALIGN, "int4": scheme.group_size}.get(scheme.name, 1))


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


def pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dim to `width`."""
    return tensor if tensor.size(-1) == width else F.pad(tensor, (0, width - tensor.size(-1)))


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in_padded], scales [out] in scale_dtype): symmetric per output channel.

    The scale is rounded to its stored dtype first, so q rounds against the scale the kernel uses.
    """
    w = pad_columns(weight.float(), padded(weight.size(1), Scheme("int8")))
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """float32 q * s, cut to the unpadded in_features."""
    return (q.float() * scales.float()[:, None])[:, :in_features]


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int32 [out_padded, in_padded] in 0..15, scales_and_zeros [groups, out_padded, 2]): gpt-fast's scheme.

    gpt-fast's get_group_qparams / group_quantize_tensor_from_qparams, with one difference: the scale
    is rounded to its stored dtype first, and the zero and the codes are computed from that rounded
    scale in float32 (gpt-fast and torchao use the float32 scale and form min + 8 s in the 16-bit
    dtype), so q rounds against the scale and zero the kernel uses; ~1-2% of codes then differ from
    theirs by one, next to a rounding boundary (tests/test_quantize.py compares them).
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
    return bitsandbytes().functional.quantize_4bit(weight.contiguous().reshape(-1), blocksize=NF4_BLOCK, compress_statistics=True,
                                                   quant_type="nf4", quant_storage=torch.uint8)


def by_rows(quantize_rows, weight: torch.Tensor, *args, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8 / quantize_int4 on blocks of `rows` rows, joined: rows quantize independently,
    and the float32 working copies then stay a block's size, not the slice's."""
    parts = [quantize_rows(weight[i : i + rows], *args) for i in range(0, weight.size(0), rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([scales for _, scales in parts], dim=-1 if parts[0][1].dim() == 1 else 1)
