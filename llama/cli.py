"""The command-line edge: options the scripts share, declared once, and parsed once into typed values.

Each script builds its parser from these groups (`add_model_args`, `add_sampling_args`) and adds only
its own options; `load_spec` and `sampling` turn the parsed options into a `LoadSpec` and a
`Sampling`, checking every value on the way (a nonsense value is one `error:` line before any work).
Parsing has no side effects; what a script does to the process (CPU threads) it does itself, with
`use_threads`.
"""

import argparse
import math
import os
import sys
from typing import Optional

import torch

from llama.config import DTYPES, LoadSpec, parse_dtype
from llama.errors import UserError
from llama.kernels.schemes import parse_scheme
from llama.sampling import Sampling


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the scripts' docstrings as written and shows every option's default, unless its
    help already says what the default is (or it has none worth showing: None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


MODEL_DIR_HELP = "Meta or Hugging Face model directory (params.json + consolidated.NN.pth, or config.json + *.safetensors)"


def add_model_args(p: argparse.ArgumentParser, max_seq_len: int = 512, max_batch_size: Optional[int] = 4, compile: bool = True) -> None:
    """The model to load and how: directory, tokenizer, context, cache rows, dtype, quantization, RoPE override, threads."""
    g = p.add_argument_group("model")
    g.add_argument("--ckpt_dir", default="ckpts/stories260K", help=MODEL_DIR_HELP)
    g.add_argument("--tokenizer_path", default=None, help="default: <ckpt_dir>/tokenizer.model, else <ckpt_dir>/original/tokenizer.model")
    g.add_argument("--max_seq_len", type=int, default=max_seq_len, help="positions per sequence (prompt + completion, or a training example)")
    if max_batch_size is not None:
        g.add_argument("--max_batch_size", type=int, default=max_batch_size, help="sequences decoded together (rows of the KV cache)")
    g.add_argument("--dtype", default="auto",
                   help=f"weights and compute: auto (float32 on CPU, bfloat16 on a CUDA card that supports it), {', '.join(DTYPES)}")
    g.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="Llama 3.1+: override the RoPE scaling factor the checkpoint states (Meta's files: 8; HF's 3.2 configs: 32)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process; default: the cores idle at start (cores minus the load average) shared by "
                        "this machine's ranks, at least 1; OMP_NUM_THREADS, if set, is kept (README 'Threads')")
    g.add_argument("--quantize", default="none",
                   help="weight-only quantization of the linears, each rank its own slice: none, int8, int4 (groups of 128; "
                        "int4-g32 / int4-g64 for smaller groups) or nf4 (needs the extra 'qlora'); see README 'Quantization'")
    g.add_argument("--verify", action="store_true",
                   help="check every model file's sha256 against the folder's manifest.json before loading (~1 s per GB; sizes are always checked)")
    if compile:  # the inference scripts
        g.add_argument("--prepack", default="auto",
                       help="CPU, float32: pre-pack the dense linears' weights for a GEMM library: auto (oneDNN at 2+ threads, MKL for the "
                            "output head at 1), none (F.linear), onednn (no memory added), mkl (fastest at 1 thread; twice the "
                            "linears' memory); see README 'Threads'")
        g.add_argument("--compile", action="store_true", help="torch.compile the decoding step (CUDA graphs on GPU); compiling takes minutes on CPU")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    """How tokens are chosen; the defaults are `llama.sampling.Sampling`'s."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max_tokens", type=int, default=max_tokens, help="tokens to generate per prompt (stops early at a stop token)")
    g.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 is greedy; above 0 samples from softmax(logits / temperature)")
    g.add_argument("--top_p", type=float, default=Sampling.top_p, help="nucleus sampling mass, in (0, 1] (temperature > 0)")
    g.add_argument("--seed", type=int, default=1, help="sampling seed, the same on every rank so ranks agree")


def positive(name: str, value: Optional[int]) -> Optional[int]:
    """`value` of option --name if at least 1 (or None), else a UserError."""
    if value is not None and value < 1:
        raise UserError(f"--{name} must be at least 1, got {value}")
    return value


def load_spec(args: argparse.Namespace, max_batch_size: Optional[int] = None) -> LoadSpec:
    """The model group's options as a LoadSpec (`max_batch_size`: the KV-cache rows of a script without
    that option, 0 for training)."""
    for name in ("max_seq_len", "max_batch_size", "threads"):
        positive(name, getattr(args, name, None))
    factor = args.rope_scaling_factor
    if factor is not None and not (math.isfinite(factor) and factor > 0):
        raise UserError(f"--rope_scaling_factor must be a positive number, got {factor}")
    return LoadSpec(
        ckpt_dir=args.ckpt_dir, tokenizer_path=args.tokenizer_path, max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size if max_batch_size is None else max_batch_size,
        dtype=None if args.dtype == "auto" else parse_dtype(args.dtype), quantize=parse_scheme(args.quantize), rope_scaling_factor=factor,
        verify=args.verify, prepack=getattr(args, "prepack", "auto"),
    )


def sampling(args: argparse.Namespace) -> Sampling:
    """The sampling group's options as a Sampling (checked)."""
    positive("max_tokens", args.max_tokens)
    return Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens)


def use_threads(threads: Optional[int]) -> int:
    """--threads: this process's CPU threads; None: OMP_NUM_THREADS if the environment sets it (torch
    read it at start), else `default_threads()`. Returns the number in use."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def default_threads() -> int:
    """The cores nobody else is using, shared by this job's ranks on this machine, at least 1.

    torch's own default (every core) is pathological on a busy or small machine: OpenMP's threads
    wait for each other at every kernel's end, and a core taken by another process stalls them all
    (stories260K decode on 2 cores under a load of ~3: 33 tok/s at 2 threads, 255 at 1). So the
    default takes the cores left idle (the 1-minute load average subtracted), split over the local
    ranks: all of them on a quiet machine, one thread per rank on a busy one or when ranks >= cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cores - int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else cores
    return max(1, min(cores, idle) // local_ranks())


def local_ranks() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 for plain python)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def say_compiling(enabled: bool, is_main: bool) -> None:
    """torch.compile on CPU is silent for minutes: say so once (rank 0)."""
    if enabled and is_main:
        print("note: --compile: compiling the decoding step; the first tokens wait for it (minutes on CPU)", file=sys.stderr, flush=True)
