"""This project's fine-tuning step vs Hugging Face transformers + PEFT on the same weights and batch.

    python bench/hf_compare.py --shape 110M --batch_size 4 --seq_len 128 --threads 2

Each configuration runs in a process of its own so its peak RSS is its own: ours (prompt, LoRA
r=8 on the seven block linears, full) through bench/train_throughput.py's step, and HF's
LlamaForCausalLM built from a config and given the same random weights (q/k rows in HF's order),
wrapped by PEFT (LoRA r=8 on q/k/v/o/gate/up/down_proj, alpha 16; prompt tuning with 16 virtual
tokens) and trained with its own loss on the same batch and AdamW. Prints one JSON line per
configuration and a table with our tokens/s and peak RSS (the whole job's: TP ranks x rank 0's
high-water mark) relative to HF's for the same method.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import format_table, peak_memory, reset_peak_memory  # noqa: E402
from bench.generate import SHAPES, shape_args  # noqa: E402
from llama.errors import run_cli  # noqa: E402
from llama.formats import hf  # noqa: E402
from llama.formats import layout  # noqa: E402
from llama.tuning.data import IGNORE_INDEX  # noqa: E402

OURS = ("prompt", "lora", "full")
THEIRS = ("hf-prompt", "hf-lora")
TABLE = [("config", "config", ""), ("tp", "TP", ""), ("tokens_per_s", "tokens/s", ".0f"), ("rank_rss_gib", "peak RSS/rank GiB", ".2f"),
         ("peak_rss_gib", "job RSS GiB", ".2f"), ("speed_vs_hf", "x HF tokens/s", ".2f"), ("rss_vs_hf", "x HF RSS", ".2f")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="110M", choices=[s for s in SHAPES if SHAPES[s] is not None])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the fastest is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes for our configurations")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one HF configuration
    return parser.parse_args(argv)


def hf_model(shape: str):
    """A transformers Llama of the shape, with bench/generate.py's random weights (seed 0, one rank) in HF's layout."""
    import transformers

    args = shape_args(shape, None, "cpu")
    config = transformers.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                                      num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                                      max_position_embeddings=1024, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape_ in layout.full_shapes(args).items():  # the order and scale random_model draws
        w = torch.ones(shape_) if key.endswith("norm.weight") else torch.randn(shape_, generator=gen).mul_(shape_[-1] ** -0.5)
        heads = hf.qk_heads(key, args)
        state[hf.hf_name(key)] = hf.to_hf_rows(w, heads) if heads else w
    model.load_state_dict(state, strict=True)
    return model, args


def run_hf(config: str, cli: argparse.Namespace) -> dict:
    """One HF + PEFT configuration: tokens/s (fastest step) and peak RSS of this process."""
    import peft

    torch.set_num_threads(cli.threads)
    reset_peak_memory(torch.device("cpu"))
    model, args = hf_model(cli.shape)
    if config == "hf-lora":
        peft_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    else:
        peft_config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)
    model = peft.get_peft_model(model, peft_config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)  # bench/train_throughput.py's synthetic batch
    ids = torch.randint(0, args.vocab_size, (cli.batch_size, cli.seq_len), generator=gen)
    labels = ids.clone()
    labels[:, : cli.seq_len // 4] = IGNORE_INDEX

    def step() -> None:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(cli.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_memory(torch.device("cpu")) / 2**30
    return {"config": config, "tp": 1, "tokens_per_s": cli.batch_size * cli.seq_len / min(times), "rank_rss_gib": peak, "peak_rss_gib": peak}


def run_ours(method: str, tp: int, cli: argparse.Namespace) -> dict:
    """bench/train_throughput.py for one method in its own (torchrun) job."""
    bench = [str(REPO / "bench" / "train_throughput.py"), "--method", method, "--shapes", cli.shape, "--batch_size", str(cli.batch_size),
             "--seq_len", str(cli.seq_len), "--steps", str(cli.steps), "--threads", str(max(1, cli.threads // tp)), "--device", "cpu"]
    launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp)]
    out = subprocess.run([*launcher, *bench], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(max(1, cli.threads // tp))}).stdout
    record = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    # peak_mem_gib is rank 0's high-water mark; the ranks hold equal slices, so the job holds ~tp x that
    return {"config": method, "tp": tp, "tokens_per_s": record["tokens_per_s"], "rank_rss_gib": record["peak_mem_gib"],
            "peak_rss_gib": tp * record["peak_mem_gib"]}


def main() -> None:
    cli = parse_args()
    if cli.one:
        print(json.dumps(run_hf(cli.one, cli)), flush=True)
        return
    records = []
    for config in THEIRS:
        argv = [sys.executable, __file__, "--one", config, "--shape", cli.shape, "--batch_size", str(cli.batch_size),
                "--seq_len", str(cli.seq_len), "--steps", str(cli.steps), "--threads", str(cli.threads)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(cli.threads)}).stdout
        records.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), flush=True)
    for tp in cli.tp:
        for method in OURS:
            records.append(run_ours(method, tp, cli))
            print(json.dumps(records[-1]), flush=True)
    theirs = {r["config"].removeprefix("hf-"): r for r in records if r["config"].startswith("hf-")}
    for r in records:
        ref = theirs.get(r["config"])
        if ref is not None and not r["config"].startswith("hf-"):
            r["speed_vs_hf"], r["rss_vs_hf"] = r["tokens_per_s"] / ref["tokens_per_s"], r["peak_rss_gib"] / ref["peak_rss_gib"]
    print(f"# {cli.shape}, batch {cli.batch_size} x {cli.seq_len}, float32, {cli.threads} threads in all")
    print(format_table(records, TABLE), flush=True)


if __name__ == "__main__":
    run_cli(main)
