"""Fine-tune a Llama split over tensor-parallel ranks: `python ft_main.py` or `torchrun --nproc_per_node N ft_main.py`.

--method prompt (default): learn a soft prompt before the tokens; the model is frozen.
--method lora: learn low-rank adapters inside the parallel linears; the model is frozen.
--method full: learn every weight, each rank its own slices (AdamW states sharded over dp).

The world is tp x dp processes (`--tp`, default all of them): the model is split over the tp
ranks of a group, and each data-parallel group reads different batches. What a method trains
and writes lives in llama/tuning/methods.py; this file is the one loop they share.

Outputs in --out_dir (default runs/<method>): the method's result (prompt.pt + peft/, adapter.pt +
peft/, or model/ as a Meta checkpoint), ckpt.pt and per-rank files (for --resume), and
metrics.jsonl (plot it with `python -m llama.tuning.plot`).
"""

import argparse
import math
import os
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from llama import cli, distributed, lora, quantize
from llama.errors import UserError, run_cli
from llama.model import Transformer
from llama.tokenizer import find_tokenizer, load_tokenizer
from llama.tuning import data, methods, packing, train
from llama.tuning.prompt import INITS

# Options a resumed run may change; everything else comes from the checkpoint, so it continues exactly.
RESUMABLE_OVERRIDES = {"max_steps", "eval_interval", "eval_batches", "ckpt_interval", "resume", "out_dir"}
DEFAULT_INIT_TEXT = "Below is an instruction. Write a response that completes the request."


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_model_args(p, max_seq_len=256, max_batch_size=None, compile=False)
    p.add_argument("--method", default="prompt", choices=list(methods.METHODS), help="what trains: a soft prompt, LoRA adapters, or all weights")
    p.add_argument("--data", default="datasets/alpaca_en_demo.json", help="alpaca-format JSON list or JSONL")
    p.add_argument("--template", default="alpaca", help=f"prompt template: {', '.join(data.TEMPLATES)}")
    p.add_argument("--field_map", default=None, help="map field names, e.g. instruction=prompt,output=completion")
    p.add_argument("--train_on_inputs", action="store_true", help="also learn the prompt/template tokens")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of records held out for eval")
    p.add_argument("--max_examples", type=int, default=None, help="use only this many records")
    p.add_argument("--group_by_length", action="store_true", help="batch examples of similar length (less padding)")
    p.add_argument("--pack", action="store_true", help="pack whole examples into rows of --max_seq_len (no padding, per-example "
                   "attention); --batch_size then counts rows")
    p.add_argument("--n_virtual_tokens", type=int, default=16, help="rows of the soft prompt")
    p.add_argument("--init", default="text", choices=INITS, help="prompt init: text, vocab or random")
    p.add_argument("--init_text", default=DEFAULT_INIT_TEXT, help="text whose token embeddings start the prompt (--init text)")
    p.add_argument("--lora_rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scale numerator: updates are scaled by alpha / r")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA input (TP>1 then draws other masks than TP=1)")
    p.add_argument("--lora_targets", default=",".join(lora.DEFAULT_TARGETS), help=f"layers given adapters, from {', '.join(lora.TARGETS)}")
    p.add_argument("--checkpoint_activations", action="store_true", help="full, lora: recompute each block in backward (less memory)")
    p.add_argument("--batch_size", type=int, default=8, help="examples per micro-batch on each data-parallel rank")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max_steps", type=int, default=100, help="optimizer steps to run")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate; default per method: prompt 0.03, lora 3e-3, full 1e-3")
    p.add_argument("--min_lr", type=float, default=None, help="end of the cosine decay; default lr / 10")
    p.add_argument("--warmup_steps", type=int, default=10, help="linear warmup steps")
    p.add_argument("--lr_decay_steps", type=int, default=None, help="step the cosine reaches min_lr; default max_steps")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--eval_interval", type=int, default=25, help="steps between eval losses")
    p.add_argument("--eval_batches", type=int, default=0, help="held-out batches per eval (0 = all)")
    p.add_argument("--ckpt_interval", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--chunk_size", type=int, default=256, help="positions per cross-entropy chunk (bounds logits memory)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per group (default: the whole world)")
    p.add_argument("--seed", type=int, default=0, help="prompt init, data order and split")
    p.add_argument("--out_dir", default=None, help="where outputs and checkpoints go (default runs/prompt_tuning, runs/lora, runs/full)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out_dir/ckpt.pt")
    p.add_argument("--force", action="store_true", help="start over in an --out_dir that holds an earlier run, deleting its files")
    return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, Optional[dict]]:
    """Command-line options, or on --resume the checkpoint's options (+ the few that may change)."""
    args = cli.check_args(build_parser().parse_args(argv))
    args.out_dir = args.out_dir or methods.METHODS[args.method].defaults["out_dir"]
    if args.resume and args.force:
        raise UserError("--resume continues the run in --out_dir and --force deletes it: pass one of them")
    if not args.resume:
        check_out_dir(Path(args.out_dir), args.force)
        return args, None
    saved = train.load_checkpoint(Path(args.out_dir) / "ckpt.pt")
    probe = build_parser()  # the same parser with None defaults tells which options were typed
    probe.set_defaults(**{name: None for name in vars(args)})
    typed = {name: value for name, value in vars(probe.parse_args(argv)).items() if value is not None}
    config = saved["config"]
    for name, value in typed.items():
        if name not in RESUMABLE_OVERRIDES and value != config.get(name):
            raise UserError(f"--{name} {value} differs from the checkpoint's {config.get(name)}: a resumed run keeps its "
                            f"options (only {', '.join(sorted(RESUMABLE_OVERRIDES - {'resume', 'out_dir'}))} may change)")
    return argparse.Namespace(**{**config, **typed}), saved


def resolve(args: argparse.Namespace, parallel: distributed.Parallel) -> argparse.Namespace:
    """Fill defaults that depend on others or on the device, and check ranges once."""
    args.dtype = cli.resolve_dtype(args.dtype, parallel.device)
    quantize.check_training(args.method, quantize.parse_scheme(getattr(args, "quantize", "none")))
    args.lr = methods.METHODS[args.method].defaults["lr"] if args.lr is None else args.lr
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.lr_decay_steps = args.lr_decay_steps or args.max_steps
    args.tokenizer_path = str(find_tokenizer(args.ckpt_dir, args.tokenizer_path))
    if args.method == "lora":
        lora.parse_targets(args.lora_targets)
    if args.pack and args.group_by_length:
        raise UserError("--pack and --group_by_length exclude each other: packing already fills rows with whole examples; drop one")
    return cli.check_args(args)


# What a run writes into --out_dir; --force deletes these (and nothing else) before starting over.
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "prompt.pt", "adapter.pt", "peft", "model", "lora_optimizer.*.pt", "optimizer.*.pt")


def check_out_dir(out_dir: Path, force: bool) -> None:
    """An --out_dir holding an earlier run is kept unless --force (then its run files are deleted)."""
    earlier = sorted(path for pattern in RUN_FILES for path in out_dir.glob(pattern)) if out_dir.is_dir() else []
    if earlier and not force:
        raise UserError(f"{out_dir} holds an earlier run ({', '.join(p.name for p in earlier[:3])}): pass --resume to continue it, "
                        "--force to start over (deleting it), or choose another --out_dir")
    if earlier and int(os.environ.get("RANK", "0")) == 0:  # one process deletes; the others only read options here
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def main(argv: Optional[list[str]] = None) -> methods.Method:
    args, saved = parse_args(argv)
    parallel = distributed.setup(args.tp)
    try:
        return tune(resolve(args, parallel), parallel, saved)
    finally:
        distributed.teardown()


@dataclass
class Run:
    """Everything the loop works on, built by `prepare`."""

    model: Transformer
    method: methods.Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager]
    batches: train.TrainBatches | packing.PackedBatches
    val_batches: list[train.Batch]
    untuned_val_batches: list[train.Batch]
    """The held-out batches for the bare model: val_batches, but packed without soft-prompt slots."""
    step: int


def prepare(args: argparse.Namespace, parallel: distributed.Parallel, saved: Optional[dict]) -> Run:
    """Load the model and the data, make what trains and its optimizer, restore a checkpoint."""
    device, dtype = parallel.device, cli.parse_dtype(args.dtype)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer_path)
    method = methods.make_method(args, parallel)
    model = method.build(tokenizer, Path(args.out_dir) if saved else None)
    splits = data.build_splits(args.data, tokenizer, args.template, args.max_seq_len, args.val_fraction, args.seed,
                               args.train_on_inputs, data.parse_field_map(args.field_map), args.max_examples, show_progress=parallel.is_main)
    if parallel.is_main:
        print(splits.summary(), flush=True)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id

    optimizer = method.optimizer(parallel.dp_group)
    use_amp = device.type == "cuda" and dtype != torch.float32  # CPU trains in float32
    autocast = partial(torch.autocast, device.type, dtype=dtype) if use_amp else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and dtype == torch.float16)
    step, position = 0, {}
    if saved is not None:
        method.restore(saved, optimizer, Path(args.out_dir))
        step, position = saved["step"], saved["data"]
        train.set_rng_state(saved["rng"])
    if args.pack:
        return Run(model, method, optimizer, scaler, autocast, *packed_data(args, method, splits, pad_id, position), step)
    batches = train.TrainBatches(splits.train, args.batch_size, args.seed, parallel.dp_rank, parallel.dp_size, args.group_by_length, pad_id, **position)
    val_batches = train.eval_batches(splits.val, args.batch_size, parallel.dp_rank, parallel.dp_size, pad_id, args.eval_batches)
    return Run(model, method, optimizer, scaler, autocast, batches, val_batches, val_batches, step)


def packed_data(args: argparse.Namespace, method: methods.Method, splits: data.Splits, pad_id: int, position: dict):
    """--pack: training batches of packed rows, and the held-out examples packed with and without soft-prompt slots."""
    parallel, capacity = method.parallel, method.positions()  # prompt tuning: its rows come before every example
    n_virtual = method.n_virtual_tokens
    batches = packing.PackedBatches(splits.train, args.batch_size, args.seed, parallel.dp_rank, parallel.dp_size, capacity, pad_id, n_virtual, **position)
    if parallel.is_main:
        print(f"packing: rows of {capacity} slots, {batches.fill_rate():.1%} filled", flush=True)
    val = partial(packing.eval_batches, splits.val, args.batch_size, parallel.dp_rank, parallel.dp_size, capacity, pad_id, limit=args.eval_batches)
    return batches, val(n_virtual=n_virtual), val(n_virtual=0)


def tune(args: argparse.Namespace, parallel: distributed.Parallel, saved: Optional[dict]) -> methods.Method:
    """The loop: eval now and then; fetch micro-batches; set lr; gradients; clip; step; log; checkpoint."""
    run = prepare(args, parallel, saved)
    method, optimizer, scaler, step = run.method, run.optimizer, run.scaler, run.step
    params, split = method.trainable(), method.split()
    out_dir, is_main, dp_group = Path(args.out_dir), parallel.is_main, parallel.dp_group
    metrics = train.MetricsLog(out_dir / "metrics.jsonl", resume_step=step if saved else None) if is_main else None
    evaluate = partial(method.evaluate, chunk_size=args.chunk_size, dp_group=dp_group, autocast=run.autocast)
    untuned_loss = untuned(saved, partial(evaluate, run.untuned_val_batches, tuned=False), bool(run.val_batches))  # the figure to beat
    last_ckpt = step if saved else None
    progress = tqdm(total=args.max_steps, initial=step, desc=f"{method.name} tuning", disable=not is_main)
    while step < args.max_steps:
        if step % args.eval_interval == 0 and run.val_batches:
            log_eval(metrics, progress, step, evaluate(run.val_batches), untuned_loss)

        micro_batches, n_tokens = zip(*(run.batches.next() for _ in range(args.grad_accum)))
        lr = train.get_lr(step, args.lr, args.min_lr, args.warmup_steps, args.lr_decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        loss, n_labels = method.accumulate(micro_batches, args.chunk_size, dp_group, run.autocast, scaler.scale)
        scaler.unscale_(optimizer)
        grad_norm = train.clip_gradients(params, split, args.grad_clip, parallel.tp_group)
        if not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm)):
            raise UserError(diverged_message(step + 1, loss, grad_norm, out_dir, last_ckpt))
        scaler.step(optimizer)  # an fp16 step with inf gradients is skipped and the scale lowered
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if is_main:
            tokens_per_s = sum(n_tokens) * parallel.dp_size / (time.perf_counter() - start)  # this rank's share x dp ranks
            metrics.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "label_tokens": n_labels,
                           "tokens_per_s": tokens_per_s, "peak_mem_mb": train.peak_memory_mb(parallel.device)})
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            progress.update()
        if step % args.ckpt_interval == 0 or step == args.max_steps:
            save_all(args, run, step, lr, out_dir, untuned_loss)
            last_ckpt = step
    progress.close()
    if run.val_batches:
        log_eval(metrics, None, step, evaluate(run.val_batches), untuned_loss)
    if is_main:
        print(f"done: {step} steps; {method.outputs(out_dir)}", flush=True)
    return method


def untuned(saved: Optional[dict], evaluate: Callable, has_val: bool) -> float:
    """Held-out loss of the model as loaded (a fresh run's step 0; kept in ckpt.pt for resumed runs)."""
    if saved is not None and "untuned_loss" in saved:
        return saved["untuned_loss"]
    return evaluate()[0] if has_val else math.nan


def log_eval(metrics: Optional[train.MetricsLog], progress: Optional[tqdm], step: int, result: tuple[float, float], untuned_loss: float) -> None:
    """Record the held-out loss next to the untuned model's (rank 0 only)."""
    if metrics is None:
        return
    loss, ppl = result
    metrics.write({"step": step, "eval_loss": loss, "eval_ppl": ppl, "eval_loss_untuned": untuned_loss})
    (progress.write if progress else print)(f"step {step}: eval loss {loss:.4f} (perplexity {ppl:.2f}); untuned model {untuned_loss:.4f}")


def save_all(args: argparse.Namespace, run: Run, step: int, lr: float, out_dir: Path, untuned_loss: float) -> None:
    """Every rank writes the method's files it owns; then rank 0 writes ckpt.pt, which names the step."""
    run.method.save(out_dir, step, run.optimizer)
    torch.distributed.barrier()
    if run.method.parallel.is_main:
        schedule = {"lr": args.lr, "min_lr": args.min_lr, "warmup_steps": args.warmup_steps, "decay_steps": args.lr_decay_steps, "last_lr": lr}
        parallel = run.method.parallel
        state = {**run.method.shared_state(run.optimizer), "untuned_loss": untuned_loss, "layout": {"tp": parallel.tp_size, "dp": parallel.dp_size}}
        train.save_training_state(out_dir / "ckpt.pt", state, schedule, step, run.batches.state(), vars(args))


def diverged_message(step: int, loss: float, grad_norm: float, out_dir: Path, last_ckpt: Optional[int]) -> str:
    last = (f"the last good checkpoint is {out_dir / 'ckpt.pt'} (step {last_ckpt}; continue with --resume)"
            if last_ckpt is not None else "no checkpoint was written yet")
    return f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; lower --lr or --grad_clip (or use float32); {last}"


if __name__ == "__main__":
    run_cli(main)
