"""fp32 decode with pre-packed dense weights (issue 24's next lever), against llama.cpp f32, same run.

    python bench/fp32_packed.py --threads 1      # then --threads 2; reuses bench/decode.py's files in --keep

A prototype, not the package's code: it loads the 110M fp32 checkpoint as bench/decode.py does and swaps
the dense products of the output head only, or of every linear, for MKL's packed GEMM
(`mkl._mkl_reorder_linear_weight(w, 1)` + `mkl._mkl_linear`: packed for one row count, the original
weight kept for the others) or oneDNN's (`mkldnn._reorder_linear_weight` + `mkldnn._linear_pointwise`:
an opaque layout, any row count), each behind a custom op so the dynamic-shape compiled step traces it
(inductor's own lowering of `_mkl_linear` asserts on the row-count argument). Every engine decodes
compiled (`--compile` on CPU); engines run in rotated rounds (bench/decode.py's `run_group`).
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import decode

_PACKED: dict[int, tuple] = {}
_handles = itertools.count()


@torch.library.custom_op("bench::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    kind, packed, weight = _PACKED[handle]
    if kind == "mkl":
        return torch.ops.mkl._mkl_linear(x, packed, weight, None, 1)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, kind: str):
        super().__init__()
        self.out_features, self.handle = weight.size(0), next(_handles)
        if kind == "mkl":
            _PACKED[self.handle] = (kind, torch.ops.mkl._mkl_reorder_linear_weight(weight, 1), weight)
        else:
            _PACKED[self.handle] = (kind, torch.ops.mkldnn._reorder_linear_weight(weight, 1), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        return packed_linear(flat, self.handle, self.out_features).reshape(*x.shape[:-1], self.out_features)


def swap(model, kind: str, head_only: bool) -> None:
    layers = [model.output] if head_only else [m for m in model.modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 2
                                                 and hasattr(m, "kernel")]
    for layer in layers:
        layer.kernel = PackedLinear(layer.weight.data, kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--keep", default="/tmp/decode_bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 64
    files = decode.make_files(Path(args.keep), "110M", True)
    engines = {"llama.cpp f32": decode.LlamaCpp(files["f32"], args.threads, 512)}
    for name, kind, head_only in [("fp32 F.linear", None, False), ("fp32 head mkl", "mkl", True), ("fp32 head onednn", "onednn", True),
                                  ("fp32 all mkl", "mkl", False), ("fp32 all onednn", "onednn", False),
                                  ("fp32 onednn, head mkl", "both", False)]:
        model = decode.load(files["ckpt"], "fp32", decode.Levers(), 1, 512)
        if kind == "both":
            swap(model, "onednn", False)
            swap(model, "mkl", True)
        elif kind:
            swap(model, kind, head_only)
        engines[name] = decode.Ours(model, "fp32", decode.Levers(compile="dynamic"), 1, args.steps)
    best, _, bandwidth = decode.run_group(engines, steps=args.steps, repeats=args.repeats, bandwidth_buffer=torch.empty(2**27))
    print(f"# 110M, batch 1, {args.threads} thread(s), compiled, read bandwidth {bandwidth:.1f} GB/s")
    for name in engines:
        print(f"{name}: {args.steps / best[name]:.1f} tok/s, x{best['llama.cpp f32'] / best[name]:.2f} llama.cpp f32")
    del engines  # llama.cpp frees its model now, not during interpreter shutdown


if __name__ == "__main__":
    main()
