"""Helpers shared by the benchmark scripts: device sync, copy bandwidth, peak memory, output.

Every figure a bench prints is measured in the same run, on the same device, so ratios such as
"fraction of the memory roofline" compare like with like.
"""

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from llama import distributed


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Fastest of `repeats` timed calls in seconds: other jobs on a shared machine only slow runs down."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def rotated(items: Sequence, round_index: int) -> list:
    """`items` starting at round_index (mod len): interleaved candidates take turns at going first, so whatever
    the first timing of a round pays (a machine shared with other jobs showed up to 1.5x on it) is shared."""
    shift = round_index % len(items) if items else 0
    return list(items[shift:]) + list(items[:shift])


def read_bandwidth(buffer: torch.Tensor) -> float:
    """Bytes/s of reading `buffer` once (what a decode step does to its weights): the better of a sum and of a
    matrix-vector product over it (either alone varies by ~20% from round to round on a shared machine)."""
    seconds = []
    for read in (lambda: buffer.sum(), lambda: torch.mv(buffer.view(-1, 8192), buffer[:8192])):
        begin = time.perf_counter()
        read()
        seconds.append(time.perf_counter() - begin)
    return buffer.numel() * buffer.element_size() / min(seconds)


def copy_bandwidth(device: torch.device, n_bytes: int = 256 << 20, repeats: int = 10) -> float:
    """Memory-copy bandwidth in bytes/s, counting bytes read + written (the STREAM-copy convention).

    The buffer is far larger than any CPU cache, so this is DRAM (or HBM) bandwidth. A GPU
    copies 256 MiB in ~0.2 ms, so each timing there covers 20 copies to drown the sync cost.
    """
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copies = 1 if device.type == "cpu" else 20

    def copy() -> None:
        for _ in range(copies):
            dst.copy_(src)

    seconds = best_time(copy, device, repeats=repeats, warmup=2)
    return 2 * n_bytes * copies / seconds


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator stats, or Linux's RSS high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # writing 5 to clear_refs resets VmHWM (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole process lifetime


def peak_memory(device: torch.device) -> int:
    """Peak bytes since `reset_peak_memory`: torch.cuda.max_memory_allocated, or the CPU RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def emit_json(record: dict, path: Optional[Path] = None) -> None:
    """Print one JSON line (and append it to `path` if given), the machine-readable result."""
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(line + "\n")


def format_table(records: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of `records`; columns are (key, header, format spec such as '.1f')."""
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    rows = []
    for record in records:
        cells = [_cell(record.get(key), spec) for key, _, spec in columns]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def _cell(value: object, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)


def start(threads: Optional[int], dtype: str, describe: Callable[[torch.device], str]) -> distributed.Parallel:
    """Set CPU threads, join the process groups and print the run's header line (rank 0)."""
    if threads:
        torch.set_num_threads(threads)
    parallel = distributed.setup()
    if parallel.is_main:
        print(f"# {describe(parallel.device)}, torch {torch.__version__}, {dtype}, TP={parallel.tp_size}", flush=True)
    return parallel


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"
