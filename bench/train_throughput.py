"""Fine-tuning speed: tokens/s, peak memory and model FLOP/s of ft_main.py's training step, per --method.

One step is what ft_main.py runs: forward (a soft prompt in front, LoRA adapters inside the
parallel linears, or all weights trainable), chunked cross-entropy, backward, global-norm
gradient clipping, AdamW (ZeRO-sharded for full, as in ft_main.py).

    python bench/train_throughput.py --method prompt lora full --shapes 110M   # one process per method
                                                                                  # gives each its own peak RSS
    python bench/train_throughput.py                                   # CPU: stories260K and 110M
    python bench/train_throughput.py --shapes 110M --batch_size 2 --seq_len 128
    python bench/train_throughput.py --shapes 7B --layers 2 --batch_size 1 --seq_len 128
    torchrun --nproc_per_node 2 bench/train_throughput.py --shapes 110M   # tensor parallel; rank 0 prints
    python bench/train_throughput.py --device cuda --dtype bfloat16 --shapes 7B --batch_size 8 --seq_len 512

stories260K is the bundled checkpoint; 110M (dim 768, 12 layers, 12 heads, vocab 32000) and 7B
(Llama 2 7B shapes; 2 layers on CPU unless --layers) get random weights drawn on the device. The
batches are random tokens whose first quarter is unlabelled (like an instruction prompt), so
the loss covers three quarters of the positions. Prints one JSON line per configuration, then
a Markdown table.
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402
from fairscale.nn.model_parallel import initialize as fs_init  # noqa: E402
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import device_name, emit_json, format_table, peak_memory, reset_peak_memory, start, synchronize  # noqa: E402
from bench.generate import SHAPES, STORIES, random_model, shape_args  # noqa: E402
from llama import distributed, lora  # noqa: E402
from llama.config import LoadSpec, parse_dtype  # noqa: E402
from llama.errors import UserError, run_cli  # noqa: E402
from llama.formats import layout  # noqa: E402
from llama.formats.load import load_model  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402
from llama.tuning import methods  # noqa: E402
from llama.tuning import train  # noqa: E402
from llama.tuning.data import IGNORE_INDEX  # noqa: E402
from llama.tuning.prompt import SoftPrompt  # noqa: E402

TABLE = [
    ("method", "method", ""), ("shape", "shape", ""), ("layers", "layers", ""), ("dtype", "dtype", ""), ("tp", "TP", ""), ("batch_size", "batch", ""),
    ("seq_len", "seq", ""), ("n_virtual_tokens", "P", ""), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ".0f"),
    ("model_gflop_s", "model GFLOP/s", ".1f"), ("peak_mem_gib", "peak GiB", ".2f"), ("weights_gib", "weights GiB", ".2f"),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", default=["prompt"], choices=list(methods.METHODS), help="what trains (default prompt)")
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA rank (all seven block linears, alpha 2r)")
    parser.add_argument("--checkpoint_activations", action="store_true", help="lora, full: recompute each block in backward")
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES), help="default: stories260K 110M (CPU), all (CUDA)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="frozen weights: float32, bfloat16, float16 (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence (after the soft prompt)")
    parser.add_argument("--n_virtual_tokens", type=int, default=16, help="rows of the soft prompt")
    parser.add_argument("--layers", type=int, default=None, help="layers of the random shapes (default: all)")
    parser.add_argument("--chunk_size", type=int, default=256, help="positions per cross-entropy chunk")
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the fastest is reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or (list(SHAPES) if args.device == "cuda" else ["stories260K", "110M"])
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if min(args.batch_size, args.seq_len, args.n_virtual_tokens, args.steps, args.chunk_size) < 1:
        raise UserError("--batch_size, --seq_len, --n_virtual_tokens, --steps and --chunk_size must be >= 1")
    return args


def matmul_params(args: ModelArgs) -> int:
    """Weights that multiply every token: all layers' projections and the output head (not the embedding lookup)."""
    q_out, kv_out = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    per_layer = args.dim * (2 * q_out + 2 * kv_out) + 3 * args.dim * args.hidden_dim
    return args.n_layers * per_layer + args.vocab_size * args.dim


def load(shape: str, cli: argparse.Namespace, parallel: distributed.Parallel, dtype: torch.dtype) -> Transformer:
    """This rank's frozen model for a shape, with RoPE for prompt + sequence and no KV cache, in
    training mode (the parallel layers' collectives then carry gradients)."""
    positions = cli.n_virtual_tokens + cli.seq_len
    if SHAPES[shape] is None:
        vocab = load_tokenizer(STORIES / "tokenizer.model").n_words
        spec = LoadSpec(STORIES, max_seq_len=positions, max_batch_size=0, dtype=dtype)
        model = load_model(spec, vocab_size=vocab, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
    else:
        model = random_model(shape_args(shape, cli.layers, cli.device), dtype, parallel, 0, positions)
    return model.train()


def synthetic_batch(args: ModelArgs, cli: argparse.Namespace, device: torch.device) -> train.Batch:
    """Random tokens (the same on every rank); the first quarter is unlabelled, like a prompt."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (cli.batch_size, cli.seq_len), generator=gen)
    labels = ids.clone()
    labels[:, : cli.seq_len // 4] = IGNORE_INDEX
    return ids.to(device), labels.to(device)


def trainable(method: str, model: Transformer, cli: argparse.Namespace) -> tuple[Optional[SoftPrompt], list, list[bool]]:
    """(soft prompt or None, trained parameters, which of them are split over TP ranks) for a method."""
    if method == "prompt":
        prompt = SoftPrompt(0.02 * torch.randn(cli.n_virtual_tokens, model.args.dim, generator=torch.Generator().manual_seed(0)))
        prompt = prompt.to(model.tok_embeddings.weight.device)
        return prompt, [prompt.weight], [False]
    model.activation_checkpointing = cli.checkpoint_activations
    if method == "lora":
        lora.add_lora(model, list(lora.DEFAULT_TARGETS), r=cli.lora_rank, alpha=2.0 * cli.lora_rank)
        named = list(lora.local_state(model).items())
    else:
        model.requires_grad_(True)
        named = list(model.named_parameters())
    return None, [p for _, p in named], [layout.tensor_split_dim(name) is not None for name, _ in named]


def run_config(method: str, shape: str, cli: argparse.Namespace, parallel: distributed.Parallel) -> dict:
    device, dtype = parallel.device, parse_dtype(cli.dtype)
    reset_peak_memory(device)
    model = load(shape, cli, parallel, torch.float32 if method == "full" else dtype)  # full: float32 master weights
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt, params, split = trainable(method, model, cli)
    if method == "full":
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=fs_init.get_data_parallel_group(), lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    autocast = partial(torch.autocast, device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else nullcontext
    batch = [synthetic_batch(model.args, cli, device)]

    def step() -> None:
        train.accumulate_gradients(model, prompt, batch, chunk_size=cli.chunk_size, dp_group=None, autocast=autocast, params=params)
        train.clip_gradients(params, split, 1.0, fs_init.get_model_parallel_group())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, optimizer state
    times = []
    for _ in range(cli.steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = min(times)  # other jobs on a shared machine only slow steps down
    tokens_per_s = cli.batch_size * cli.seq_len / seconds
    # Model FLOPs per token: forward 2 x params, backward of the activations another 2 x params
    # (through every layer, down to the prompt or the first adapter), and 2 x params more for the
    # weight gradients of full training: 6 x params. Frozen weights (prompt, LoRA) need no weight
    # gradients: 4 x params (LoRA's own r-wide products are left out, as are attention scores
    # and the P prompt positions).
    flops_per_s = (6 if method == "full" else 4) * matmul_params(model.args) * tokens_per_s
    return {
        "method": method, "shape": shape, "layers": model.args.n_layers, "device": device_name(device), "dtype": cli.dtype, "tp": parallel.tp_size,
        "batch_size": cli.batch_size, "seq_len": cli.seq_len, "n_virtual_tokens": cli.n_virtual_tokens if method == "prompt" else None,
        "step_ms": 1e3 * seconds, "tokens_per_s": tokens_per_s, "model_gflop_s": flops_per_s / 1e9,
        "peak_mem_gib": peak_memory(device) / 2**30, "weights_gib": weights * parallel.tp_size / 2**30,
    }


def main() -> None:
    cli = parse_args()
    if cli.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises: distributed.setup picks the CPU
    elif not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible: run on a GPU machine or pass --device cpu")
    parallel = start(cli.threads, cli.dtype, device_name)
    try:
        records = []
        configs = [(method, shape) for method in cli.method for shape in cli.shapes]
        for method, shape in tqdm(configs, desc="configurations", disable=not parallel.is_main, file=sys.stderr):
            record = run_config(method, shape, cli, parallel)
            records.append(record)
            if parallel.is_main:
                emit_json(record, cli.out)
        if parallel.is_main:
            print(format_table(records, TABLE), flush=True)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
