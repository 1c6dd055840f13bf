"""Fine-tune a Llama split over tensor-parallel ranks: `python ft_main.py` or `torchrun --nproc_per_node N ft_main.py`.

--method prompt (default): learn a soft prompt before the tokens; the model is frozen.
--method lora: learn low-rank adapters inside the parallel linears; the model is frozen.
--method full: learn every weight, each rank its own slices (AdamW states sharded over dp).
--objective sft (default): the responses' token loss; --objective dpo: preference pairs (DPO / IPO),
the reference being the model as it starts (LoRA: adapters off; prompt: the initial soft prompt; full:
log-probabilities computed once, before training).

The world is tp x dp processes (`--tp`, default all of them): the model is split over the tp
ranks of a group, and each data-parallel group reads different batches. What a method trains
and writes lives in llama/tuning/methods.py; this file is the one loop they share.

Outputs in --out_dir (default runs/<method>): the method's result (prompt.pt + peft/, adapter.pt +
peft/, or model/ as a Meta checkpoint), run_config.json (the run's options), state.pt and per-rank
files (for --resume), and metrics.jsonl (plot it with `python -m llama.tuning.plot`).
"""

import argparse
import math
import os
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from llama import cli, distributed, lora
from llama.config import resolve_dtype
from llama.errors import Interrupted, UserError, run_cli
from llama.model import Transformer
from llama.tokenizer import find_tokenizer, load_tokenizer
from llama.tuning import config as run_config
from llama.tuning import data, methods, objective, packing, preference, tracking, train
from llama.tuning.config import METHOD_DEFAULTS, TrainConfig
from llama.tuning.prompt import INITS, init_prompt


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_model_args(p, max_seq_len=256, max_batch_size=None, compile=False)
    p.add_argument("--method", default="prompt", choices=list(METHOD_DEFAULTS), help="what trains: a soft prompt, LoRA adapters, or all weights")
    p.add_argument("--objective", default="sft", choices=run_config.OBJECTIVES, help="sft: learn the responses; dpo: learn preferences "
                   "between pairs of responses (data: prompt, chosen, rejected)")
    p.add_argument("--data", default=None, help="training data, a JSON list or JSONL: alpaca records (sft; default "
                   f"{run_config.DEFAULT_DATA['sft']}) or preference pairs (dpo; default {run_config.DEFAULT_DATA['dpo']})")
    p.add_argument("--val_data", default=None, help="held-out records of the same kind (default: --val_fraction of --data)")
    p.add_argument("--dpo_loss", default="sigmoid", choices=("sigmoid", "ipo"), help="dpo: DPO's sigmoid loss or IPO's squared one")
    p.add_argument("--beta", type=float, default=0.1, help="dpo: how far the policy may move from the reference (larger: closer)")
    p.add_argument("--label_smoothing", type=float, default=0.0, help="dpo, sigmoid: conservative DPO, the chance a pair's label is wrong")
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
    p.add_argument("--init_text", default=run_config.DEFAULT_INIT_TEXT, help="text whose token embeddings start the prompt (--init text)")
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
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out_dir")
    p.add_argument("--force", action="store_true", help="start over in an --out_dir that holds an earlier run, deleting its files")
    p.add_argument("--report_to", default="none", help="also log every metric to: none, tensorboard, wandb, or both "
                   "comma-separated (needs the extra 'track'; W&B offline with WANDB_MODE=offline)")
    p.add_argument("--logging_dir", default=None, help="TensorBoard's folder (default <out_dir>/tensorboard)")
    p.add_argument("--wandb_project", default=None, help="W&B project (default $WANDB_PROJECT, else llama-mp)")
    p.add_argument("--run_name", default=None, help="W&B run name")
    return p


def config_of(args: argparse.Namespace) -> TrainConfig:
    """The parsed options as a TrainConfig: method defaults filled in, the dtype and tokenizer resolved."""
    spec = cli.load_spec(args, max_batch_size=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what distributed.setup will pick
    spec = replace(spec, dtype=resolve_dtype(spec.dtype, device), tokenizer_path=find_tokenizer(spec.ckpt_dir, spec.tokenizer_path))
    lr = args.lr if args.lr is not None else METHOD_DEFAULTS[args.method]["lr"]
    fields = {name: value for name, value in vars(args).items() if name in TrainConfig.__dataclass_fields__}
    fields.update(model=spec, lr=lr, min_lr=lr / 10 if args.min_lr is None else args.min_lr, lr_decay_steps=args.lr_decay_steps or args.max_steps,
                  out_dir=args.out_dir or METHOD_DEFAULTS[args.method]["out_dir"], lora_targets=lora.parse_targets(args.lora_targets),
                  field_map=data.parse_field_map(args.field_map), data=args.data or run_config.DEFAULT_DATA[args.objective],
                  report_to=tracking.parse_report_to(args.report_to))
    return TrainConfig(**fields)


def parse_args(argv: Optional[list[str]] = None) -> tuple[TrainConfig, Optional[dict]]:
    """The run's config and, on --resume, its saved training state (the saved config + the few options that may change)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.force:
        raise UserError("--resume continues the run in --out_dir and --force deletes it: pass one of them")
    if args.resume and args.out_dir is None:
        args.out_dir = METHOD_DEFAULTS[args.method]["out_dir"]
    now = config_of(args)
    if not args.resume:
        check_out_dir(now.out_dir, args.force)
        return now, None
    state = train.load_training_state(now.out_dir)
    saved = run_config.load(now.out_dir) if (now.out_dir / run_config.CONFIG).is_file() else run_config.from_options(state["config"])
    probe = build_parser()  # the same parser with None defaults tells which options were typed
    probe.set_defaults(**{name: None for name in vars(args)})
    typed = {name: value for name, value in vars(probe.parse_args(argv)).items() if value is not None and name not in ("resume", "out_dir")}
    return run_config.resumed(replace(saved, out_dir=now.out_dir), typed, now), state


# What a run writes into --out_dir; --force deletes these (and nothing else) before starting over.
RUN_FILES = (run_config.CONFIG, "state.pt", "ckpt.pt", "metrics.jsonl", "prompt.pt", "adapter.pt", "peft", "model", "lora_optimizer.*.pt",
             "optimizer.*.pt", objective.REFERENCE, "tensorboard", "wandb", tracking.WANDB_STATE)


def check_out_dir(out_dir: Path, force: bool) -> None:
    """An --out_dir holding an earlier run is kept unless --force (then its run files are deleted)."""
    earlier = sorted(path for pattern in RUN_FILES for path in out_dir.glob(pattern)) if out_dir.is_dir() else []
    if earlier and not force:
        raise UserError(f"{out_dir} holds an earlier run ({', '.join(p.name for p in earlier[:3])}): pass --resume to continue it, "
                        "--force to start over (deleting it), or choose another --out_dir")
    if earlier and int(os.environ.get("RANK", "0")) == 0:  # one process deletes; the others only read options here
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def main(argv: Optional[list[str]] = None) -> Optional[methods.Method]:
    config, state = parse_args(argv)
    if state is not None and state["step"] >= config.max_steps:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"nothing to do: the run in {config.out_dir} finished at step {state['step']} (--max_steps {config.max_steps}); "
                  "pass a larger --max_steps with --resume to train on", flush=True)
        return None
    cli.use_threads(config.threads)
    parallel = distributed.setup(config.tp)
    try:
        return tune(config, parallel, state)
    except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to continue
        raise Interrupted(interrupted_message(config, last_saved_step(config.out_dir))) from None
    finally:
        distributed.teardown()


@dataclass
class Run:
    """Everything the loop works on, built by `prepare`."""

    model: Transformer
    method: methods.Method
    objective: objective.SFT | objective.DPO
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager]
    batches: train.TrainBatches | packing.PackedBatches | preference.PairBatches
    val_batches: list
    untuned_val_batches: list[train.Batch]
    """The held-out batches for the bare model: val_batches, but packed without soft-prompt slots."""
    step: int


def prepare(config: TrainConfig, parallel: distributed.Parallel, state: Optional[dict]) -> Run:
    """Load the model and the data, make what trains and its optimizer, restore a saved run."""
    device, dtype = parallel.device, config.model.dtype
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    method = methods.make_method(config, parallel)
    model = method.build(tokenizer, config.out_dir if state else None)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    optimizer = method.optimizer(parallel.dp_group)
    use_amp = device.type == "cuda" and dtype != torch.float32  # CPU trains in float32
    autocast = partial(torch.autocast, device.type, dtype=dtype) if use_amp else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and dtype == torch.float16)
    step, position = 0, {}
    if state is not None:
        method.restore(state, optimizer, config.out_dir)
        step, position = state["step"], state["data"]
        train.set_rng_state(state["rng"])
    if config.objective == "dpo":
        goal, batches, val_batches = preference_data(config, method, tokenizer, pad_id, position, autocast, fresh=state is None)
        return Run(model, method, goal, optimizer, scaler, autocast, batches, val_batches, val_batches, step)
    goal = objective.SFT(method, config.chunk_size)
    splits = data.build_splits(config.data, tokenizer, template=config.template, max_seq_len=config.model.max_seq_len,
                               val_fraction=config.val_fraction, seed=config.seed, train_on_inputs=config.train_on_inputs,
                               field_map=config.field_map, max_examples=config.max_examples, val_path=config.val_data,
                               show_progress=parallel.is_main)
    if parallel.is_main:
        print(splits.summary(), flush=True)
    if config.pack:
        return Run(model, method, goal, optimizer, scaler, autocast, *packed_data(config, method, splits, pad_id, position), step)
    batches = train.TrainBatches(splits.train, config.batch_size, seed=config.seed, dp_rank=parallel.dp_rank, dp_size=parallel.dp_size,
                                 group_by_length=config.group_by_length, pad_id=pad_id, **position)
    val_batches = train.eval_batches(splits.val, config.batch_size, dp_rank=parallel.dp_rank, dp_size=parallel.dp_size, pad_id=pad_id,
                                     limit=config.eval_batches)
    return Run(model, method, goal, optimizer, scaler, autocast, batches, val_batches, val_batches, step)


def preference_data(config: TrainConfig, method: methods.Method, tokenizer, pad_id: int, position: dict, autocast, fresh: bool):
    """--objective dpo: the DPO objective (with full tuning's reference log-probs, computed now or read
    back), the training batches of pairs and the held-out ones."""
    parallel = method.parallel
    splits = preference.build_pair_splits(config.data, tokenizer, template=config.template, max_seq_len=config.model.max_seq_len,
                                          val_fraction=config.val_fraction, seed=config.seed, field_map=config.field_map,
                                          max_examples=config.max_examples, val_path=config.val_data, show_progress=parallel.is_main)
    if parallel.is_main:
        print(splits.summary(), flush=True)
    reference_prompt = None
    if method.prompt is not None:  # the reference is the policy at step 0: the prompt as init_prompt made it (again on --resume)
        reference_prompt = init_prompt(method.model, tokenizer, n_virtual_tokens=config.n_virtual_tokens, init=config.init, init_text=config.init_text, seed=config.seed)
        reference_prompt = reference_prompt.to(parallel.device).requires_grad_(False)
    goal = objective.DPO(method, config.dpo, config.chunk_size, reference_prompt=reference_prompt)
    if not method.reference_on_the_fly:
        if fresh:
            goal.reference = objective.reference_table(goal, {"train": splits.train, "val": splits.val}, batch_size=config.batch_size,
                                                       pad_id=pad_id, dp_rank=parallel.dp_rank, dp_size=parallel.dp_size,
                                                       dp_group=parallel.dp_group, autocast=autocast, show_progress=parallel.is_main)
            if parallel.is_main:
                objective.save_reference(goal.reference, config.out_dir)
        else:
            goal.reference = objective.load_reference(config.out_dir)
    batches = preference.PairBatches(splits.train, config.batch_size, seed=config.seed, dp_rank=parallel.dp_rank, dp_size=parallel.dp_size,
                                     pad_id=pad_id, group_by_length=config.group_by_length, **position)
    val_batches = preference.eval_pair_batches(splits.val, config.batch_size, dp_rank=parallel.dp_rank, dp_size=parallel.dp_size,
                                               pad_id=pad_id, limit=config.eval_batches)
    return goal, batches, val_batches


def packed_data(config: TrainConfig, method: methods.Method, splits: data.Splits, pad_id: int, position: dict):
    """--pack: training batches of packed rows, and the held-out examples packed with and without soft-prompt slots."""
    parallel, capacity = method.parallel, method.positions()  # prompt tuning: its rows come before every example
    n_virtual = method.n_virtual_tokens
    batches = packing.PackedBatches(splits.train, config.batch_size, seed=config.seed, dp_rank=parallel.dp_rank, dp_size=parallel.dp_size,
                                    capacity=capacity, pad_id=pad_id, n_virtual=n_virtual, **position)
    if parallel.is_main:
        print(f"packing: rows of {capacity} slots, {batches.fill_rate():.1%} filled", flush=True)
    val = partial(packing.eval_batches, splits.val, config.batch_size, dp_rank=parallel.dp_rank, dp_size=parallel.dp_size, capacity=capacity,
                  pad_id=pad_id, limit=config.eval_batches)
    return batches, val(n_virtual=n_virtual), val(n_virtual=0)


def tune(config: TrainConfig, parallel: distributed.Parallel, state: Optional[dict]) -> methods.Method:
    """The loop: eval now and then; fetch micro-batches; set lr; gradients; clip; step; log; checkpoint."""
    run = prepare(config, parallel, state)
    method, step = run.method, run.step
    out_dir, is_main, dp_group = config.out_dir, parallel.is_main, parallel.dp_group
    metrics = train.MetricsLog(out_dir / "metrics.jsonl", resume_step=step if state else None) if is_main else None
    if metrics is not None:
        metrics.tracker = tracker(config, step, state)  # after the log is cut back to the resumed step
    try:  # the trackers' files are closed (W&B's run finished) however the loop ends: an error, Ctrl-C
        evaluate = partial(run.objective.evaluate, dp_group=dp_group, autocast=run.autocast)
        untuned_loss = untuned(config, run, state)  # SFT: the figure to beat
        last_saved = step if state else None
        optimizer, scaler = run.optimizer, run.scaler
        params, split = method.trainable(), method.split()
        with tqdm(total=config.max_steps, initial=step, desc=f"{method.name} tuning", disable=not is_main) as progress:  # closed on Ctrl-C too
            while step < config.max_steps:
                if step % config.eval_interval == 0 and run.val_batches:
                    log_eval(metrics, progress, step, evaluate(run.val_batches), untuned_loss)

                micro_batches, n_tokens = zip(*(run.batches.next() for _ in range(config.grad_accum)))
                lr = train.get_lr(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps, decay_steps=config.lr_decay_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                start = time.perf_counter()
                loss, figures = run.objective.accumulate(micro_batches, dp_group=dp_group, autocast=run.autocast, scale=scaler.scale)
                scaler.unscale_(optimizer)
                grad_norm = train.clip_gradients(params, split, config.grad_clip, parallel.tp_group)
                if not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm)):
                    raise UserError(diverged_message(step + 1, loss, grad_norm, out_dir, last_saved))
                scaler.step(optimizer)  # an fp16 step with inf gradients is skipped and the scale lowered
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                if is_main:
                    tokens_per_s = sum(n_tokens) * parallel.dp_size / (time.perf_counter() - start)  # this rank's share x dp ranks
                    metrics.write({"step": step, "loss": loss, **figures, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                                   "peak_mem_mb": train.peak_memory_mb(parallel.device)})
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    progress.update()
                if step % config.ckpt_interval == 0 or step == config.max_steps:
                    save_all(config, run, step, lr, untuned_loss)
                    last_saved = step
        if run.val_batches:
            log_eval(metrics, None, step, evaluate(run.val_batches), untuned_loss)
    finally:
        if metrics is not None:
            metrics.close()
    if is_main:
        print(f"done: {step} steps; {method.outputs(out_dir)}", flush=True)
    return method


def tracker(config: TrainConfig, step: int, state: Optional[dict]) -> Optional[tracking.Tracker]:
    """--report_to's trackers on rank 0; a resumed run continues the same runs from its checkpoint's step
    (what metrics.jsonl keeps of that step is logged again: TensorBoard drops everything from it on)."""
    if not config.report_to:
        return None
    kept = [r for r in train.read_metrics(config.out_dir / "metrics.jsonl") if r["step"] == step] if state else []
    return tracking.Tracker(config.out_dir, config.report_to, run_config.to_json(config), logging_dir=config.logging_dir,
                            project=config.wandb_project, run_name=config.run_name, resume_step=step if state else None, replay=kept)


def last_saved_step(out_dir: Path) -> Optional[int]:
    """The step of the training state in `out_dir`, if one was written."""
    path = out_dir / train.STATE
    return train.load_training_state(out_dir)["step"] if path.is_file() else None


def interrupted_message(config: TrainConfig, saved: Optional[int]) -> str:
    if saved is None:
        return f"no checkpoint was written yet in {config.out_dir}; rerun with --force to start over"
    return f"the last checkpoint is {config.out_dir / train.STATE} (step {saved}); continue with --resume --out_dir {config.out_dir}"


def untuned(config: TrainConfig, run: Run, state: Optional[dict]) -> Optional[float]:
    """SFT: the held-out loss of the model as loaded (a fresh run's step 0; kept in state.pt for resumed
    runs). DPO has its reference instead: at step 0 its loss is ln 2 and its rewards 0."""
    if config.objective != "sft":
        return None
    if state is not None and "untuned_loss" in state:
        return state["untuned_loss"]
    if not run.untuned_val_batches:
        return math.nan
    return run.method.evaluate(run.untuned_val_batches, chunk_size=config.chunk_size, dp_group=run.method.parallel.dp_group,
                               autocast=run.autocast, tuned=False)[0]


def log_eval(metrics: Optional[train.MetricsLog], progress: Optional[tqdm], step: int, record: dict, untuned_loss: Optional[float]) -> None:
    """Record the held-out figures (SFT: next to the untuned model's loss) and say them (rank 0 only)."""
    if metrics is None:
        return
    if untuned_loss is not None:
        record = {**record, "eval_loss_untuned": untuned_loss}
    metrics.write({"step": step, **record})
    if "eval_ppl" in record:
        line = f"eval loss {record['eval_loss']:.4f} (perplexity {record['eval_ppl']:.2f}); untuned model {untuned_loss:.4f}"
    else:
        line = (f"eval loss {record['eval_loss']:.4f}, reward accuracy {record['eval_rewards/accuracies']:.3f}, "
                f"margin {record['eval_rewards/margins']:.4f}")
    (progress.write if progress else print)(f"step {step}: {line}")


def save_all(config: TrainConfig, run: Run, step: int, lr: float, untuned_loss: float) -> None:
    """Every rank writes the method's files it owns; then rank 0 writes run_config.json and, last, state.pt, which names the step."""
    out_dir = config.out_dir
    run.method.save(out_dir, step, run.optimizer)
    torch.distributed.barrier()
    parallel = run.method.parallel
    if parallel.is_main:
        schedule = {"lr": config.lr, "min_lr": config.min_lr, "warmup_steps": config.warmup_steps, "decay_steps": config.lr_decay_steps, "last_lr": lr}
        method_state = {**run.method.shared_state(run.optimizer), "untuned_loss": untuned_loss, "layout": {"tp": parallel.tp_size, "dp": parallel.dp_size}}
        run_config.save(config, out_dir)
        train.save_training_state(out_dir, method_state, schedule=schedule, step=step, data_position=run.batches.state())
        (out_dir / train.OLD_STATE).unlink(missing_ok=True)  # a resumed old-layout run now lives in run_config.json + state.pt


def diverged_message(step: int, loss: float, grad_norm: float, out_dir: Path, last_saved: Optional[int]) -> str:
    last = (f"the last good checkpoint is {out_dir / train.STATE} (step {last_saved}; continue with --resume)"
            if last_saved is not None else "no checkpoint was written yet")
    return f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; lower --lr or --grad_clip (or use float32); {last}"


if __name__ == "__main__":
    run_cli(main)
