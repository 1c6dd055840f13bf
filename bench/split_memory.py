"""Memory and speed of split_model's resharding on a checkpoint with Llama 7B layer shapes.

  python bench/split_memory.py [--layers 2] [--dtype bfloat16] [--workdir /tmp]

Writes a random 1-shard checkpoint (dim 4096, 32 heads, hidden 11008, vocab 32000; a child
process makes it, so its memory does not count here), then splits it 1 -> 4 and merges it back
4 -> 1 in this process and prints, per step: seconds, throughput against a plain copy (+ fsync)
of the same file measured in the same run, the largest output shard, and the peak anonymous
memory (RssAnon sampled from /proc/self/status; unlike VmHWM it leaves out the memory-mapped
input's file pages) against the bound 1.25 x largest shard + 300 MB. MB = 10^6 bytes.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llama.config import parse_dtype  # noqa: E402
from llama.formats import open_checkpoint  # noqa: E402
from llama.formats.checkpoint import verify  # noqa: E402
from llama.formats.convert import reshard  # noqa: E402
from llama.formats.layout import random_state_dict  # noqa: E402
from llama.formats.params import model_args  # noqa: E402

PARAMS_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "norm_eps": 1e-05, "vocab_size": 32000}
MB = 10**6


def rss_anon() -> int:
    """Resident anonymous memory of this process in bytes (heap, tensors; not mapped files)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    """Samples RssAnon every `interval` seconds in a thread (torch's copies release the GIL)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self.peak = rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def make_checkpoint(ckpt_dir: Path, layers: int, dtype_name: str) -> None:
    """Random Meta-layout 1-shard checkpoint (run in a child process)."""
    params = {**PARAMS_7B, "n_layers": layers}
    state = random_state_dict(model_args(params), seed=0, dtype=parse_dtype(dtype_name))
    torch.save(state, ckpt_dir / "consolidated.00.pth")
    (ckpt_dir / "params.json").write_text(json.dumps(params))


def timed_copy(src: Path, dst: Path) -> float:
    """Seconds for a plain copy flushed to disk, as the resharder flushes its shards."""
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def measure(label: str, run, out_dir: Path, copy_rate: float) -> str:
    """Run one reshard and format its row."""
    with PeakSampler() as sampler:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    shard_sizes = [p.stat().st_size for p in out_dir.glob("consolidated.*.pth")]
    largest, rate = max(shard_sizes), sum(shard_sizes) / seconds
    bound = 1.25 * largest + 300 * MB
    verdict = "ok" if sampler.peak <= bound else "OVER"
    return (f"{label:<14} {seconds:>7.1f} {rate / 1e9:>6.2f} {rate / copy_rate:>7.2f}x {largest / MB:>9.0f} "
            f"{sampler.peak / MB:>9.0f} {bound / MB:>9.0f}  {verdict}")


def make_checkpoint_apart(out: Path, layers: int, dtype: str) -> int:
    """`make_checkpoint` in a spawned process (its memory never counts here); the shard's bytes."""
    child = multiprocessing.get_context("spawn").Process(target=make_checkpoint, args=(out, layers, dtype))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit("making the random checkpoint failed")
    return (out / "consolidated.00.pth").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (7B has 32; 2 runs in about a minute)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the checkpoint (Meta ships bfloat16)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: system temp dir)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="split_memory_", dir=args.workdir))
    try:
        src, out4, out1 = work / "src", work / "src_mp4", work / "src_mp4_mp1"
        src.mkdir()
        size = make_checkpoint_apart(src, args.layers, args.dtype)
        print(f"random checkpoint, 7B layer shapes (dim 4096, 32 heads, hidden 11008, vocab 32000), "
              f"{args.layers} layers, {args.dtype}: {size / MB:.0f} MB in 1 shard")
        copy_rate = size / timed_copy(src / "consolidated.00.pth", work / "copy.pth")
        (work / "copy.pth").unlink()
        print(f"plain copy + fsync: {copy_rate / 1e9:.2f} GB/s; RssAnon before resharding: {rss_anon() / MB:.0f} MB")
        print(f"{'step':<14} {'seconds':>7} {'GB/s':>6} {'vs copy':>8} {'shard MB':>9} {'peak anon':>9} {'bound':>9}  "
              "(peak RssAnon <= 1.25 x largest shard + 300 MB)")
        print(measure("split 1 -> 4", lambda: reshard(src, num_shards=4, out_dir=out4), out4, copy_rate))
        print(measure("merge 4 -> 1", lambda: reshard(out4, num_shards=1, out_dir=out1), out1, copy_rate))
        start = time.perf_counter()
        verify(open_checkpoint(src), open_checkpoint(out1), None, progress=True)
        print(f"1 -> 4 -> 1 is bit-identical to the original (checked in {time.perf_counter() - start:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
