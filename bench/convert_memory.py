"""Memory and speed of Hugging Face folders: loading on 1 and 2 ranks vs Meta's layout, and converting.

  python bench/convert_memory.py [--layers 2] [--dtype bfloat16] [--max_shard_size 500MB] [--repeats 2] [--workdir /tmp]

Writes a random 1-shard Meta checkpoint with Llama 7B layer shapes (dim 4096, 32 heads, hidden
11008, vocab 32000; a child process makes it, so its memory does not count here), then:
- converts it Meta -> HF folder (files of --max_shard_size, several as in a real 7B folder) and
  that folder HF -> Meta (1 shard) in this process, and for comparison Meta -> Meta (the
  resharder's 1 -> 1, the same Meta writer as HF -> Meta): seconds and throughput (fastest of
  --repeats runs) against a plain copy (+ fsync) of the same bytes and against writing them from
  memory (+ fsync), both measured in the same run; the largest output file; peak anonymous memory
  (RssAnon sampled from /proc/self/status; unlike VmHWM it leaves out the memory-mapped input's
  file pages) against the resharder's bound, 1.25 x largest output file + 300 MB; then checks
  that the round trip is bit-identical;
- loads the Meta and the HF copy with `load_model` in fresh processes, 1 rank (python) and 2
  ranks (torchrun, gloo): per rank, seconds, peak RssAnon above the process's own before loading,
  and peak RSS (VmHWM, file pages included), against 1/N of the weight bytes + 5%.
MB = 10^6 bytes.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402

from bench.common import peak_memory, reset_peak_memory  # noqa: E402
from bench.split_memory import MB, PeakSampler, make_checkpoint_apart, rss_anon, timed_copy  # noqa: E402
from llama.config import LoadSpec, parse_dtype  # noqa: E402
from llama.formats import open_checkpoint  # noqa: E402
from llama.formats.checkpoint import verify  # noqa: E402
from llama.formats.convert import convert  # noqa: E402
from llama.formats.load import load_model  # noqa: E402


def load_worker(ckpt_dir: Path, dtype_name: str) -> None:
    """One rank of a load (run under python or torchrun): rank 0 prints every rank's figures as JSON."""
    import torch.distributed as dist

    from llama import distributed

    torch.set_num_threads(1)
    parallel = distributed.setup()
    dist.barrier()
    before = rss_anon()
    reset_peak_memory(torch.device("cpu"))
    with PeakSampler() as sampler:
        start = time.perf_counter()
        spec = LoadSpec(ckpt_dir, max_seq_len=64, max_batch_size=1, dtype=parse_dtype(dtype_name))
        model = load_model(spec, vocab_size=None, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
        seconds = time.perf_counter() - start
    loaded = sum(t.nbytes for t in model.parameters())
    figures = {"rank": parallel.tp_rank, "seconds": seconds, "anon": sampler.peak - before, "hwm": peak_memory(torch.device("cpu")),
               "loaded": loaded}
    gathered = [None] * parallel.world_size
    dist.all_gather_object(gathered, figures)
    if parallel.is_main:
        print(json.dumps(gathered), flush=True)
    distributed.teardown()


def launch_load(ckpt_dir: Path, n: int, dtype_name: str) -> list[dict]:
    """Per-rank figures of loading `ckpt_dir` on n ranks, each rank a fresh process."""
    script = [str(Path(__file__).resolve()), "--load", str(ckpt_dir), "--dtype", dtype_name]
    launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                                                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(launcher + script, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"loading {ckpt_dir} on {n} ranks failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_write(size: int, path: Path) -> float:
    """Seconds to write `size` bytes held in memory to a file, flushed to disk (a user-space writer's best)."""
    data = torch.ones(size, dtype=torch.uint8).numpy()
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(data))
        os.fsync(f.fileno())
    return time.perf_counter() - start


def output_files(out_dir: Path) -> list[Path]:
    return [p for p in out_dir.iterdir() if p.suffix in (".pth", ".safetensors")]


def measure_conversion(label: str, convert_once, out_dir: Path, copy_rate: float, write_rate: float, repeats: int) -> str:
    """Run one conversion `repeats` times (the output removed in between; the last one is kept):
    the fastest run's time, the highest peak of all."""
    times, peak = [], 0
    for _ in range(repeats):
        shutil.rmtree(out_dir, ignore_errors=True)
        with PeakSampler() as sampler:
            start = time.perf_counter()
            convert_once()
            times.append(time.perf_counter() - start)
        peak = max(peak, sampler.peak)
    sizes = [p.stat().st_size for p in output_files(out_dir)]
    largest, rate = max(sizes), sum(sizes) / min(times)
    bound = 1.25 * largest + 300 * MB
    verdict = "ok" if peak <= bound else "OVER"
    return (f"{label:<14} {min(times):>7.1f} {rate / 1e9:>6.2f} {rate / copy_rate:>7.2f}x {rate / write_rate:>7.2f}x {largest / MB:>9.0f} "
            f"{peak / MB:>9.0f} {bound / MB:>9.0f}  {verdict}")


def load_rows(label: str, ckpt_dir: Path, n: int, dtype_name: str, weight_bytes: int) -> list[str]:
    bound = weight_bytes / n * 1.05
    rows = []
    for r in launch_load(ckpt_dir, n, dtype_name):
        verdict = "ok" if r["anon"] <= bound else "OVER"
        rows.append(f"{label:<6} {n:>5} {r['rank']:>4} {r['seconds']:>7.2f} {r['loaded'] / MB:>9.0f} {r['anon'] / MB:>9.0f} "
                    f"{bound / MB:>9.0f} {r['hwm'] / MB:>9.0f}  {verdict}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (7B has 32; 2 runs in about a minute)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the checkpoint and of the loaded model")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: system temp dir)")
    parser.add_argument("--max_shard_size", default="500MB", help="largest HF output file (a 7B folder has 2-3 files)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each copy and conversion, the fastest kept (a shared disk is noisy)")
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)  # internal: one rank of a load measurement
    args = parser.parse_args()
    if args.load is not None:
        load_worker(args.load, args.dtype)
        return

    work = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir))
    try:
        meta, hf, back = work / "meta", work / "meta_hf", work / "meta_hf_meta"
        meta.mkdir()
        size = make_checkpoint_apart(meta, args.layers, args.dtype)
        print(f"random checkpoint, 7B layer shapes (dim 4096, 32 heads, hidden 11008, vocab 32000), "
              f"{args.layers} layers, {args.dtype}: {size / MB:.0f} MB in 1 Meta shard")
        copy_rate = size / min(timed_copy(meta / "consolidated.00.pth", work / "copy.pth") for _ in range(args.repeats))
        write_rate = size / min(timed_write(size, work / "write.bin") for _ in range(args.repeats))
        (work / "copy.pth").unlink()
        (work / "write.bin").unlink()
        print(f"best of {args.repeats}: plain copy + fsync {copy_rate / 1e9:.2f} GB/s; writing the same bytes from memory + fsync "
              f"{write_rate / 1e9:.2f} GB/s = {write_rate / copy_rate:.2f}x copy (a converter's ceiling: a copy can stay in the kernel)")
        print(f"RssAnon before converting: {rss_anon() / MB:.0f} MB")
        print(f"{'conversion':<14} {'seconds':>7} {'GB/s':>6} {'vs copy':>8} {'vs write':>8} {'file MB':>9} {'peak anon':>9} {'bound':>9}  "
              "(peak RssAnon <= 1.25 x largest output file + 300 MB)")
        rates = (copy_rate, write_rate, args.repeats)
        print(measure_conversion("Meta -> HF", lambda: convert(meta, out_format="hf", out_dir=hf, progress=False, max_shard_size=args.max_shard_size), hf, *rates))
        print(measure_conversion("HF -> Meta", lambda: convert(hf, out_format="meta", num_shards=1, out_dir=back, progress=False), back, *rates))
        print(measure_conversion("Meta -> Meta", lambda: convert(meta, out_format="meta", num_shards=1, out_dir=work / "meta_meta", progress=False),
                                 work / "meta_meta", *rates) + "  (the resharder, for comparison)")
        shutil.rmtree(work / "meta_meta")
        identical = (back / "consolidated.00.pth").read_bytes() == (meta / "consolidated.00.pth").read_bytes()
        verify(open_checkpoint(meta), open_checkpoint(hf), None, progress=False)
        print(f"HF copy equals the original weights; Meta -> HF -> Meta byte-identical: {identical}")

        ckpt = open_checkpoint(meta)
        weight_bytes = sum(ckpt.shape(k).numel() * ckpt.dtype(k).itemsize for k in ckpt.keys)
        print(f"\nloading with load_model ({args.dtype}, max_seq_len 64, batch 1), each rank a fresh process; "
              f"weights {weight_bytes / MB:.0f} MB")
        print(f"{'layout':<6} {'ranks':>5} {'rank':>4} {'seconds':>7} {'loaded MB':>9} {'peak anon':>9} {'bound':>9} {'peak RSS':>9}  "
              "(peak RssAnon above the process's own <= weights / N + 5%)")
        for n in (1, 2):
            for label, path in (("Meta", meta), ("HF", hf)):
                print("\n".join(load_rows(label, path, n, args.dtype, weight_bytes)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
