"""Options the command-line scripts share, declared once with their defaults and validation.

Each script builds its parser from these groups (`add_model_args`, `add_sampling_args`, ...) and
adds only its own options; `check_args` validates every shared option it finds, so a nonsense
value is one `error:` line before any work starts.
"""

import argparse
import math
import sys
from typing import Optional

import torch

from llama import quantize
from llama.errors import UserError
from llama.sampling import Sampling
from llama.sampling import check as check_sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the scripts' docstrings as written and shows every option's default."""


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
                   help="CPU threads per process (torch.set_num_threads); on a busy or 2-core machine 1 is often 2-3x faster")
    quantize.add_option(g)
    if compile:
        g.add_argument("--compile", action="store_true", help="torch.compile the decoding step (CUDA graphs on GPU); compiling takes minutes on CPU")


def add_sampling_args(p: argparse.ArgumentParser, max_gen_len: int = 64) -> None:
    """How tokens are chosen; the defaults are `llama.sampling.Sampling`'s."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max_gen_len", type=int, default=max_gen_len, help="tokens to generate per prompt (stops early at EOS)")
    g.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 is greedy; above 0 samples from softmax(logits / temperature)")
    g.add_argument("--top_p", type=float, default=Sampling.top_p, help="nucleus sampling mass, in (0, 1] (temperature > 0)")
    g.add_argument("--seed", type=int, default=1, help="sampling seed, the same on every rank so ranks agree")


POSITIVE = ("max_seq_len", "max_batch_size", "max_gen_len", "threads", "batch_size", "grad_accum", "max_steps", "eval_interval",
            "ckpt_interval", "chunk_size", "lora_rank", "num_shards", "data_parallel", "n_virtual_tokens")


def check_args(args: argparse.Namespace, dtype: bool = True) -> argparse.Namespace:
    """Validate every shared option present in `args`: one `error:` line for the first bad one.

    `dtype`: --dtype is the model group's (split_model.py's names output formats' dtypes and checks them itself)."""
    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if hasattr(args, "temperature"):
        check_sampling(args.temperature, args.top_p)
    factor = getattr(args, "rope_scaling_factor", None)
    if factor is not None and not (math.isfinite(factor) and factor > 0):
        raise UserError(f"--rope_scaling_factor must be a positive number, got {factor}")
    if dtype and getattr(args, "dtype", "auto") != "auto":
        parse_dtype(args.dtype)
    lr, min_lr = getattr(args, "lr", None), getattr(args, "min_lr", None)  # AdamW moves a weight by about lr a step
    if lr is not None and not (math.isfinite(lr) and 0 < lr <= 1):
        raise UserError(f"--lr must be in (0, 1], got {lr}: e.g. 3e-3 for LoRA, 0.03 for a soft prompt")
    if min_lr is not None and not (math.isfinite(min_lr) and 0 <= min_lr <= 1):
        raise UserError(f"--min_lr must be in [0, 1], got {min_lr}")
    if hasattr(args, "quantize"):
        quantize.parse_scheme(args.quantize)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args


def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> float32 on CPU (CPU kernels are fastest and exact there), bfloat16 on CUDA cards that support it."""
    if name != "auto":
        parse_dtype(name)
        return name
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def rope_override(args: argparse.Namespace) -> Optional[dict]:
    """--rope_scaling_factor as an override of the checkpoint's RoPE scaling constants."""
    return {"factor": args.rope_scaling_factor} if args.rope_scaling_factor is not None else None


def sampling_of(args: argparse.Namespace) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_new=args.max_gen_len)


def say_compiling(enabled: bool, is_main: bool) -> None:
    """torch.compile on CPU is silent for minutes: say so once (rank 0)."""
    if enabled and is_main:
        print("note: --compile: compiling the decoding step; the first tokens wait for it (minutes on CPU)", file=sys.stderr, flush=True)
