"""What bounds CPU decoding: matrix-vector bandwidth of the model's weight shapes, by implementation.

A decoding step at batch 1 is a chain of matrix-vector products, so its speed is the bandwidth
at which they stream the weights. This measures, next to the copy bandwidth of bench/common.py:

- `linear`: F.linear as the model calls it (MKL on x86 CPU builds of torch);
- `onednn`: oneDNN's linear on a prepacked weight (what inductor's `freezing` uses; a second,
  repacked copy of every weight);
- `split`: the weight's rows split into `--split` blocks run as one batched matmul (bmm);
- `fused`: one product over wq|wk|wv (resp. w1|w3) concatenated, against the separate ones.

    python bench/matvec.py --threads 1
    python bench/matvec.py --threads 2 --shapes 110M

Prints one JSON line per (shape, implementation), then a table. Not a test: figures only.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import copy_bandwidth, emit_json, format_table  # noqa: E402

# (out_features, in_features) of the weights a decoding step reads, per model shape.
SHAPES = {
    "110M": [(768, 768), (2048, 768), (768, 2048), (32000, 768)],
    "7B": [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)],
}
# Per layer of the 110M shape: (separate weights, fused) for attention q|k|v and SwiGLU w1|w3.
FUSIONS = {"wq|wk|wv": [(768, 768)] * 3, "w1|w3": [(2048, 768)] * 2}
TABLE = [("shape", "weight", ""), ("impl", "implementation", ""), ("gb_s", "GB/s", ".1f"), ("of_copy", "of copy bandwidth", ".0%")]


def stream_rate(shape: tuple[int, int], product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], total_bytes: int, repeats: int) -> float:
    """GB/s of `product(x, w)` over enough distinct weights of `shape` that none stays in cache."""
    out, inp = shape
    weights = [torch.randn(out, inp) for _ in range(max(2, total_bytes // (out * inp * 4)))]
    x = torch.randn(1, 1, inp)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        for w in weights:
            product(x, w)
        best = min(best, time.perf_counter() - start)
    return len(weights) * out * inp * 4 / best / 1e9


def split_rows(blocks: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """x @ w.T with w's rows in `blocks` groups computed as one bmm (each group a matrix-vector product)."""

    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows = w.view(blocks, -1, w.size(1)).transpose(1, 2)
        return torch.bmm(x.view(1, 1, -1).expand(blocks, 1, -1), rows).view(1, 1, -1)

    return product


def onednn_rate(shape: tuple[int, int], total_bytes: int, repeats: int) -> Optional[float]:
    """Like stream_rate for oneDNN's linear on prepacked weights; None where torch lacks it."""
    try:
        pack = torch.ops.mkldnn._reorder_linear_weight
        linear = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    packed: dict[int, torch.Tensor] = {}

    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if id(w) not in packed:
            packed[id(w)] = pack(w, 1)
        return linear(x.view(1, -1), packed[id(w)], None, "none", [], "")

    return stream_rate(shape, product, total_bytes, repeats)


def fused_rates(total_bytes: int, repeats: int) -> list[dict]:
    """Separate vs concatenated products for one 110M layer's q|k|v and w1|w3 (bytes/s of weights)."""
    records = []
    for name, parts in FUSIONS.items():
        n_layers = max(2, total_bytes // sum(o * i * 4 for o, i in parts))
        separate = [[torch.randn(o, i) for o, i in parts] for _ in range(n_layers)]
        fused = [torch.cat(layer) for layer in separate]
        x = torch.randn(1, 1, parts[0][1])
        times = {"separate": float("inf"), "fused": float("inf")}
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for layer in separate:
                for w in layer:
                    F.linear(x, w)
            times["separate"] = min(times["separate"], time.perf_counter() - start)
            start = time.perf_counter()
            for w in fused:
                F.linear(x, w)
            times["fused"] = min(times["fused"], time.perf_counter() - start)
        n_bytes = n_layers * sum(o * i * 4 for o, i in parts)
        records += [{"shape": name, "impl": impl, "gb_s": n_bytes / t / 1e9} for impl, t in times.items()]
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--split", type=int, default=2, help="row blocks of the `split` implementation")
    parser.add_argument("--mib", type=int, default=256, help="weight bytes streamed per timing (MiB), beyond the caches")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu, total = torch.device("cpu"), args.mib << 20
    copy = copy_bandwidth(cpu) / 1e9
    print(f"# {torch.get_num_threads()} threads, copy bandwidth {copy:.1f} GB/s (read + written)", flush=True)
    records = []
    with torch.inference_mode():
        for shape in (s for name in args.shapes for s in SHAPES[name]):
            rates = {
                "linear": stream_rate(shape, lambda x, w: F.linear(x, w), total, args.repeats),
                "onednn": onednn_rate(shape, total, args.repeats),
                f"split{args.split}": stream_rate(shape, split_rows(args.split), total, args.repeats),
            }
            records += [{"shape": f"{shape[0]}x{shape[1]}", "impl": impl, "gb_s": r} for impl, r in rates.items() if r is not None]
        if "110M" in args.shapes:
            records += fused_rates(total, args.repeats)
    for record in records:
        record.update(bench="matvec", threads=torch.get_num_threads(), copy_gb_s=copy, of_copy=record["gb_s"] / copy)
        emit_json(record)
    print(format_table(records, TABLE), flush=True)


if __name__ == "__main__":
    main()
