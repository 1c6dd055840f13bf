"""torchrun worker for test_packed.py: the bundled model loaded for inference with its dense linears packed, TP=2.

    torchrun --nproc_per_node 2 tests/packed_worker.py --out DIR

For --prepack onednn and mkl, each rank writes DIR/<pack>.rank<R>.pt: for every packed kernel on it, the
worst ratio of its error to the float32 bound (`packed_check`) on inputs of 1 and 4 rows, and whether
the weight it multiplies by is this rank's slice of the checkpoint exactly; and the logits of fixed
tokens, with the same model loaded unpacked (F.linear on the slices) to compare.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when not pip-installed
from llama import distributed, formats  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.formats.load import load_model  # noqa: E402
from llama.kernels.packed import PackedLinear  # noqa: E402

STORIES = Path(__file__).resolve().parent.parent / "ckpts" / "stories260K"
TOKENS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
U32 = 2**-24  # float32 unit roundoff


def packed_check(kernel: PackedLinear, W: torch.Tensor, x: torch.Tensor) -> float:
    """max |kernel(x) - x W^T| / (gamma_K S), against the exact product (float64 of float32 inputs: exact to
    well below float32's roundoff), S = |x| @ |W|^T, gamma_K = K u / (1 - K u): a float32 product of K terms
    summed in any order, with or without FMA, is within gamma_K S of it. At most 1 for a correct kernel."""
    K = W.size(1)
    gamma = K * U32 / (1 - K * U32)
    exact = x.double() @ W.double().t()
    bound = gamma * (x.double().abs() @ W.double().abs().t())
    return ((kernel(x).double() - exact).abs() / bound.clamp(min=1e-300)).max().item()


def slice_of(model, name: str, ckpt, rank: int = 0, size: int = 1) -> torch.Tensor:
    """Rank `rank` of `size`'s float32 slice of the linear `name` from the checkpoint (a fused one: its parts'
    slices stacked)."""
    parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    parts = getattr(type(model.get_submodule(parent)), "FUSED", {}).get(leaf)
    keys = [f"{parent}.{p}.weight" for p in parts] if parts else [f"{name}.weight"]
    return torch.cat([ckpt.read(key, rank, size).float() for key in keys])


def outputs(pack: str, parallel: distributed.Parallel) -> dict:
    spec = LoadSpec(STORIES, max_seq_len=64, max_batch_size=2, dtype=torch.float32, prepack=pack)
    load = dict(vocab_size=512, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
    packed, dense = load_model(spec, inference=True, **load), load_model(spec, **load)
    ckpt, gen = formats.open_checkpoint(STORIES), torch.Generator().manual_seed(parallel.tp_rank)
    checks = {}
    for name, module in packed.named_modules():
        if isinstance(module, PackedLinear):
            layer = name.removesuffix(".kernel")
            W = slice_of(packed, layer, ckpt, parallel.tp_rank, parallel.tp_size)
            ratio = max(packed_check(module, W, torch.randn(rows, module.in_features, generator=gen)) for rows in (1, 4))
            checks[layer] = (module.packing, ratio, torch.equal(module.unpack(), W))
    with torch.inference_mode():
        return {"checks": checks, "logits": packed(TOKENS, 0), "dense_logits": dense(TOKENS, 0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    parallel = distributed.setup(2)
    for pack in ("onednn", "mkl"):
        torch.save(outputs(pack, parallel), args.out / f"{pack}.rank{parallel.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main()
