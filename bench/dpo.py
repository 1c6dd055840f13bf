"""DPO's training step vs an SFT step on the same pairs, and vs TRL's DPOTrainer + PEFT on the same model and pairs.

    python bench/dpo.py                          # TP=1 and TP=2 (torchrun, 1 thread per rank) and TRL; 3 rounds
    python bench/dpo.py --rounds 2 --steps 3 --tp 1

The model is the Llama-2-110M shape (dim 768, 12 layers, 12 heads, vocab 32000) with random
weights (llama.formats.layout.random_state_dict), written once as a Meta checkpoint with the
Llama 2 tokenizer and converted by `split_model.py --out_format hf` for transformers. The pairs are
4 records of datasets/dpo_en_demo.jsonl whose prompt + each response fill 128 tokens (plain
template), so every row of every configuration is 128 tokens. LoRA r=8, alpha 16 on the seven block
linears, float32, AdamW lr 1e-3, gradient clipping at 1.0, beta 0.1, one thread per rank.

Configurations, each in a process of its own (its peak RSS is its own), run in interleaved rounds
(every configuration once per round; the fastest step of each over all rounds is reported: other
jobs on a shared machine only slow steps down):
- ours, dpo: ft_main.py's step for --objective dpo (llama/tuning/objective.py's DPO.accumulate: the
  reference forward with the adapters off under no_grad, then chosen + rejected in one forward
  with gradients, vocabulary-parallel log-probs), clipping, AdamW;
- ours, sft-chosen: ft_main.py's SFT step on the pairs' 4 chosen rows (what SFT would learn from them);
- ours, sft-both: the SFT step on all 8 rows (the tokens a DPO step pushes through with gradients);
- trl, dpo: TRL's DPOTrainer with a PEFT LoraConfig of the same shape on transformers'
  LlamaForCausalLM from the exported folder (reference: the same model with the adapter disabled,
  TRL's default without ref_model), the same 4 pairs as text, max_length 128, timed per optimizer
  step by a TrainerCallback. TRL 1.16's DPOConfig defaults to bf16=True and gradient_checkpointing=True;
  both are turned off here to compare like with like (float32, no recomputation, as ours runs). On a
  CPU without native bfloat16 matmuls (this one: no AVX512-BF16/AMX) its default bf16 autocast sends
  every matmul through PyTorch's reference GEMM: a 1-layer cut of this model took 91 s a step.

Peak RSS is the process's high-water mark (Linux VmHWM) from just before the model is loaded, so it
includes what the imported runtime already held (`base`); `added` is peak - base, what the planner
(`split_model.py --plan`: weights + grad/opt + activations, no overhead) estimates. TP=2 rows are
per rank (rank 0; the ranks hold equal slices).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import format_table, peak_memory, reset_peak_memory  # noqa: E402
from bench.generate import shape_args  # noqa: E402

LLAMA2_TOKENIZER = REPO / "tests" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
DEMO = REPO / "datasets" / "dpo_en_demo.jsonl"
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("dpo", "sft-chosen", "sft-both")
TABLE = [("config", "config", ""), ("tp", "TP", ""), ("rows", "rows x 128", ""), ("step_s", "step s", ".2f"),
         ("vs_sft_chosen", "x sft-chosen", ".2f"), ("vs_sft_both", "x sft-both", ".2f"), ("vs_trl", "x TRL step", ".2f"),
         ("peak_gib", "peak RSS/rank GiB", ".2f"), ("base_gib", "base GiB", ".2f"), ("added_gib", "added GiB", ".2f"),
         ("planner_gib", "planner GiB", ".2f"), ("rss_vs_trl", "x TRL RSS", ".2f")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per row (prompt + response)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all configurations")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes of our configurations")
    parser.add_argument("--no_trl", action="store_true", help="skip TRL's DPOTrainer")
    parser.add_argument("--trl_checkpointing", action="store_true", help="TRL with gradient checkpointing (its default; off here, as ours)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoint, HF folder and pairs (default: a temporary one)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration in this process
    return parser.parse_args(argv)


# ---- shared inputs -------------------------------------------------------------------------------


def prepare(work: Path, cli: argparse.Namespace) -> None:
    """The random 110M checkpoint (Meta layout), its HF export, and the pairs file."""
    from llama.formats import layout
    from llama.formats.params import params_from_args
    from llama.tokenizer import load_tokenizer
    from llama.tuning import preference

    meta = work / "meta"
    if not (meta / "consolidated.00.pth").is_file():
        meta.mkdir(parents=True, exist_ok=True)
        args = shape_args("110M", None, "cpu")
        torch.save(layout.random_state_dict(args, seed=0), meta / "consolidated.00.pth")
        (meta / "params.json").write_text(json.dumps(params_from_args(args)) + "\n")
        shutil.copy(LLAMA2_TOKENIZER, meta / "tokenizer.model")
    if not (work / "hf" / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "split_model.py"), "--ckpt_dir", str(meta), "--out_format", "hf", "--out_dir",
                        str(work / "hf"), "--force"], check=True, cwd=REPO, capture_output=True)
    tokenizer = load_tokenizer(meta / "tokenizer.model")
    picked = []  # the first pairs whose two rows both fill seq_len (with room to spare for TRL's own tokenization)
    for line in DEMO.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompt, good, bad = preference.encode_record(preference.Record("", record["prompt"], record["chosen"], record["rejected"]),
                                                     tokenizer, "plain", DEMO)
        if len(prompt) < cli.seq_len // 2 and len(prompt) + min(len(good), len(bad)) >= cli.seq_len + 16:
            picked.append(record)
        if len(picked) == cli.batch_size:
            break
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))


# ---- one configuration per process -----------------------------------------------------------------


def planner_bytes(args, tp: int, kind: str, cli: argparse.Namespace) -> int:
    from llama.formats import plan

    batch = cli.batch_size * (2 if kind == "sft-both" else 1)
    work = plan.Workload(mode="lora", batch=batch, seq_len=cli.seq_len, dtype_bytes=4, lora_rank=8, lora_targets=tuple(TARGETS),
                         objective="dpo" if kind == "dpo" else "sft")
    return plan.estimate(args, tp, work, overhead=0).total


def run_ours(kind: str, work: Path, cli: argparse.Namespace) -> dict:
    """ft_main.py's step (objective.DPO / objective.SFT over LoRATuning) on this job's ranks."""
    from llama import distributed
    from llama.config import LoadSpec
    from llama.tokenizer import load_tokenizer
    from llama.tuning import data, methods, objective, preference, train
    from llama.tuning.config import TrainConfig
    from llama.tuning.data import IGNORE_INDEX

    torch.set_num_threads(1)
    parallel = distributed.setup()
    try:
        tokenizer = load_tokenizer(work / "meta" / "tokenizer.model")
        pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
        pairs = preference.load_pairs(work / "pairs.jsonl", tokenizer, template="plain", max_seq_len=cli.seq_len).pairs
        base = reset_and_read(parallel.device)
        config = TrainConfig(model=LoadSpec(work / "meta", tokenizer_path=work / "meta" / "tokenizer.model", max_seq_len=cli.seq_len,
                                            max_batch_size=0, dtype=torch.float32),
                             method="lora", objective="dpo" if kind == "dpo" else "sft", lora_rank=8, lora_alpha=16.0,
                             lora_targets=tuple(TARGETS), batch_size=cli.batch_size, lr=1e-3, min_lr=1e-4, out_dir=work / "unused")
        method = methods.make_method(config, parallel)
        model = method.build(tokenizer, None)
        optimizer = method.optimizer(parallel.dp_group)
        params, split = method.trainable(), method.split()
        if kind == "dpo":
            goal = objective.DPO(method, config.dpo, config.chunk_size)
            batch = (*preference.collate_pairs(pairs, pad_id), torch.arange(len(pairs)))
        else:
            goal = objective.SFT(method, config.chunk_size)
            rows = [(p.prompt, p.chosen) for p in pairs] + ([(p.prompt, p.rejected) for p in pairs] if kind == "sft-both" else [])
            batch = data.collate([data.Example(a + b, [IGNORE_INDEX] * len(a) + b) for a, b in rows], pad_id)
        n_rows, width = batch[0].shape
        assert width == cli.seq_len, f"rows of {width} tokens, not {cli.seq_len}"

        def step() -> None:
            goal.accumulate([batch], dp_group=parallel.dp_group, autocast=nullcontext, scale=lambda loss: loss)
            train.clip_gradients(params, split, 1.0, parallel.tp_group)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times = timed(step, cli.steps)
        peak = peak_memory(parallel.device)
        return {"config": f"ours, {kind}", "tp": parallel.tp_size, "rows": n_rows, "step_s": min(times), "peak_gib": peak / 2**30,
                "base_gib": base / 2**30, "added_gib": (peak - base) / 2**30,
                "planner_gib": planner_bytes(model.args, parallel.tp_size, kind, cli) / 2**30, "is_main": parallel.is_main}
    finally:
        distributed.teardown()


def run_trl(work: Path, cli: argparse.Namespace) -> dict:
    """TRL 1.16's DPOTrainer + PEFT LoRA on transformers' Llama, the same pairs as text; one timing per optimizer step."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    base = reset_and_read(torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(work / "hf", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    times, widths = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)
            print(f"trl step {len(times)}: {times[-1]:.2f} s", file=sys.stderr, flush=True)

    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=cli.batch_size, max_steps=1 + cli.steps, learning_rate=1e-3,
                     beta=0.1, max_length=cli.seq_len, report_to="none", save_strategy="no", logging_steps=10**6,
                     use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0, max_grad_norm=1.0, lr_scheduler_type="constant",
                     bf16=False, gradient_checkpointing=cli.trl_checkpointing)  # TRL 1.16 defaults both on (see the docstring)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Timer()])
    collate = trainer.data_collator
    trainer.data_collator = lambda features: widths.append(len(features)) or collate(features)
    trainer.train()
    peak = peak_memory(torch.device("cpu"))
    return {"config": "trl, dpo", "tp": 1, "rows": 2 * widths[-1], "step_s": min(times[1:]), "peak_gib": peak / 2**30,
            "base_gib": base / 2**30, "added_gib": (peak - base) / 2**30, "is_main": True}


def reset_and_read(device: torch.device) -> int:
    """Start the peak window now and return the RSS it starts from."""
    reset_peak_memory(device)
    return peak_memory(device)


def timed(step, steps: int) -> list[float]:
    step()  # warm-up: allocator, kernels, AdamW's state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


# ---- the driver ---------------------------------------------------------------------------------


def launch(config: str, tp: int, work: Path, cli: argparse.Namespace) -> dict:
    """One configuration in a fresh process (torchrun for TP > 1, one thread per rank); its JSON line."""
    argv = [str(Path(__file__).resolve()), "--one", config, "--work", str(work), "--batch_size", str(cli.batch_size), "--seq_len",
            str(cli.seq_len), "--steps", str(cli.steps)] + (["--trl_checkpointing"] if cli.trl_checkpointing else [])
    launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([*launcher, *argv], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{config} (TP={tp}) failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith('{"config"')][-1])  # (transformers prints dicts too)


def summarise(best: dict[tuple[str, int], dict]) -> list[dict]:
    records = list(best.values())
    trl = best.get(("trl, dpo", 1))
    for r in records:
        tp = r["tp"]
        for kind, key in (("sft-chosen", "vs_sft_chosen"), ("sft-both", "vs_sft_both")):
            ref = best.get((f"ours, {kind}", tp))
            if ref is not None and r["config"] != ref["config"] and r["config"].startswith("ours"):
                r[key] = r["step_s"] / ref["step_s"]
        if trl is not None and r["config"].endswith("dpo") and r is not trl:
            r["vs_trl"], r["rss_vs_trl"] = r["step_s"] / trl["step_s"], r["peak_gib"] * r["tp"] / trl["peak_gib"]
    return records


def main() -> None:
    cli = parse_args()
    if cli.one:
        work = cli.work
        record = run_trl(work, cli) if cli.one == "trl" else run_ours(cli.one, work, cli)
        if record.pop("is_main"):
            print(json.dumps(record), flush=True)
        return
    work = cli.work or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, cli)
    configs = [(kind, tp) for tp in cli.tp for kind in KINDS] + ([] if cli.no_trl else [("trl", 1)])
    best: dict[tuple[str, int], dict] = {}
    for round_ in range(cli.rounds):
        for kind, tp in configs:  # interleaved: every configuration once per round
            record = launch(kind, tp, work, cli)
            print(json.dumps({"round": round_, **record}), flush=True)
            key = (record["config"], tp)
            old = best.get(key, record)
            memory = record if record["peak_gib"] <= old["peak_gib"] else old  # each figure its best round
            fastest = record if record["step_s"] <= old["step_s"] else old
            best[key] = {**fastest, **{k: memory[k] for k in ("peak_gib", "base_gib", "added_gib")}}
    print(f"# 110M shape, random weights, float32, LoRA r=8 on {','.join(TARGETS)}, {cli.batch_size} pairs x {cli.seq_len} tokens, "
          f"1 thread per rank, fastest step of {cli.rounds} rounds x {cli.steps} steps")
    print(format_table(summarise(best), TABLE), flush=True)
    if cli.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from llama.errors import run_cli

    run_cli(main)
