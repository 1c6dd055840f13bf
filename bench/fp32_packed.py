"""fp32 decode with pre-packed dense weights (`--prepack`, llama/kernels/packed.py PackedLinear) against llama.cpp f32, same run.

    python bench/fp32_packed.py --threads 1      # then --threads 2; reuses bench/decode.py's files in --keep

Loads the 110M fp32 checkpoint as bench/decode.py does, under each --prepack choice (none: F.linear; auto;
onednn; mkl), plus two mixes `auto` could have been: the output head alone packed by oneDNN, and every linear
by oneDNN with the head by MKL (the kernel swapped after loading). Every engine decodes compiled (`--compile`
on CPU); engines run in rotated rounds (bench/decode.py's `run_group`).
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import decode  # noqa: E402
from llama.kernels.packed import PackedLinear  # noqa: E402

VARIANTS = {  # name -> (--prepack at load, what the output head is then packed by, or None)
    "fp32 F.linear": ("none", None), "fp32 --prepack auto": ("auto", None), "fp32 --prepack onednn": ("onednn", None),
    "fp32 --prepack mkl": ("mkl", None), "fp32 head oneDNN only": ("none", "onednn"), "fp32 oneDNN, head MKL": ("onednn", "mkl"),
}


def pack_head(model, packing: str) -> None:
    head = model.output
    weight = head.weight if head.kernel is None else head.kernel.unpack()
    head.weight, head.kernel = None, PackedLinear(weight.detach(), packing)


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
    for name, (prepack, head) in VARIANTS.items():
        levers = replace(decode.Levers(compile="dynamic"), prepack=prepack)
        model = decode.load(files["ckpt"], "fp32", levers, 1, 512)
        if head:
            pack_head(model, head)
        engines[name] = decode.Ours(model, "fp32", levers, 1, args.steps)
    best, _, bandwidth = decode.run_group(engines, steps=args.steps, repeats=args.repeats, bandwidth_buffer=torch.ones(2**27))
    print(f"# 110M, batch 1, {args.threads} thread(s), compiled, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for name in engines:
        print(f"{name}: {args.steps / best[name]:.1f} tok/s, x{best['llama.cpp f32'] / best[name]:.2f} llama.cpp f32")
    del engines  # llama.cpp frees its model now, not during interpreter shutdown


if __name__ == "__main__":
    main()
