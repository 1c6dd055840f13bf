"""Real-token throughput of LoRA tuning, padded vs --pack vs transformers + PEFT; loss memory at a 128k vocabulary.

    python bench/packing.py                                   # both parts, short settings
    python bench/packing.py --part throughput --layers 12 --examples 128 --data en zh
    python bench/packing.py --part loss_memory --tokens 2048

throughput: the first --examples training examples of the bundled alpaca data (alpaca template,
Llama 2 tokenizer, --max_seq_len), one pass over all of them with LoRA r=8 on the seven block
linears: forward, loss, backward, clipping, AdamW, one optimizer step per batch, timed after a
warm-up step. transformers + PEFT (hf_compare.py's model: the 110M shape with the same random
weights) and our padded run get the same length-grouped padded batches of --batch_size examples
(sorted by length, then cut: the least padding a padded batch can have); --pack gets rows of
--max_seq_len slots, --batch_size rows a step. Real tokens are the examples' own tokens, pads
excluded, so tokens/s counts the same work for every configuration. Our runs on TP=1 and 2
(torchrun), each configuration in a process of its own with --threads threads in all.

loss_memory: the loss of --tokens positions at Llama 3 8B's head (dim 4096, vocab 128256),
forward and backward, the way each side computes it: ours chunked (--chunk_size positions, each
chunk recomputed in backward) with the logits gathered over TP ranks (the loss before
llama/tuning/loss.py) or vocabulary-parallel (llama/tuning/loss.py), and transformers' ForCausalLMLoss on the
full [tokens, vocab] logits. Per-rank peak RSS above the rank's weights and inputs.
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
import torch.nn.functional as F  # noqa: E402
from fairscale.nn.model_parallel import initialize as fs_init  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from bench.common import format_table, peak_memory, reset_peak_memory  # noqa: E402
from bench.generate import random_model, shape_args  # noqa: E402
from llama import distributed, lora  # noqa: E402
from llama.errors import run_cli  # noqa: E402
from llama.formats import layout  # noqa: E402
from llama.parallel import ColumnParallelLinear  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402
from llama.tuning import data, packing, train  # noqa: E402
from llama.tuning.data import IGNORE_INDEX  # noqa: E402
from llama.tuning.loss import chunk_loss  # noqa: E402

LLAMA2_TOKENIZER = REPO / "tests" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
DATA = {"en": REPO / "datasets" / "alpaca_en_demo.json", "zh": REPO / "datasets" / "alpaca_zh_demo.json"}
THROUGHPUT = [("data", "data", ""), ("config", "config", ""), ("tp", "TP", ""), ("steps", "steps", ""), ("fill", "slots filled", ".1%"),
              ("real_tokens_per_s", "real tokens/s", ".0f"), ("vs_peft", "x PEFT", ".2f"), ("vs_padded", "x our padded", ".2f")]
MEMORY = [("config", "loss", ""), ("tp", "TP", ""), ("loss_mib", "peak MiB/rank above weights", ".0f"), ("vs_gathered", "x gathered (same TP)", ".2f"),
          ("vs_tp1", "x TP=1 gathered", ".2f")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["throughput", "loss_memory"], choices=["throughput", "loss_memory"])
    p.add_argument("--data", nargs="+", default=["en"], choices=list(DATA))
    p.add_argument("--examples", type=int, default=64, help="training examples in the timed pass")
    p.add_argument("--max_seq_len", type=int, default=512, help="tokens per example (longer ones are cut) and slots per packed row")
    p.add_argument("--batch_size", type=int, default=4, help="examples (padded) or rows (packed) per step")
    p.add_argument("--layers", type=int, default=4, help="layers of the 110M shape (dim 768, vocab 32000)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=2, help="threads per configuration, over all its ranks")
    p.add_argument("--ours", nargs="+", default=["padded", "packed"], choices=["shuffled", "padded", "packed"],
                   help="our batches: shuffled (padded, data order), padded (length-grouped), packed")
    p.add_argument("--repeats", type=int, default=1, help="throughput: passes over the examples; the fastest counts")
    p.add_argument("--tokens", type=int, default=2048, help="loss_memory: positions")
    p.add_argument("--chunk_size", type=int, default=256, help="positions per loss chunk (ft_main.py's default)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one configuration in this process
    return p.parse_args(argv)


def examples(lang: str, cli: argparse.Namespace) -> list[data.Example]:
    """The first --examples training examples (split and order as ft_main.py's seed 0)."""
    splits = data.build_splits(DATA[lang], load_tokenizer(LLAMA2_TOKENIZER), template="alpaca", max_seq_len=cli.max_seq_len,
                               val_fraction=0.05, seed=0)
    return splits.train[: cli.examples]


def grouped_batches(items: list[data.Example], batch_size: int) -> list[list[data.Example]]:
    """Padded batches of examples of similar length: sorted, then cut."""
    ordered = sorted(items, key=lambda e: len(e.input_ids))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def timed_pass(step, batches: list, repeats: int = 1) -> float:
    """Seconds for one step per batch, after one warm-up step on the first; the fastest of
    `repeats` passes (other jobs on a shared machine only slow a pass down)."""
    step(batches[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        times.append(time.perf_counter() - start)
    return min(times)


def run_ours(config: str, lang: str, cli: argparse.Namespace) -> dict:
    """Our LoRA step over every example, padded (grouped) or packed, on this job's TP ranks."""
    parallel = distributed.setup()
    items = examples(lang, cli)
    model = random_model(shape_args("110M", cli.layers, "cpu"), torch.float32, parallel, 0, cli.max_seq_len).train()  # no KV cache
    lora.add_lora(model, list(lora.DEFAULT_TARGETS), r=8, alpha=16.0)
    named = list(lora.local_state(model).items())
    params, split = [p for _, p in named], [layout.tensor_split_dim(name) is not None for name, _ in named]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pad = 0
    if config == "packed":
        lengths = [len(e.input_ids) for e in items]
        rows = packing.pack_rows(lengths, cli.max_seq_len)
        batches = [packing.collate_rows([[items[i] for i in row] for row in rows[s : s + cli.batch_size]], pad)
                   for s in range(0, len(rows), cli.batch_size)]
        fill = packing.fill_rate(rows, lengths, cli.max_seq_len)
    else:  # padded: length-grouped; shuffled: in the data's (seeded, shuffled) order, as ft_main.py without --group_by_length
        groups = grouped_batches(items, cli.batch_size) if config == "padded" else [items[i : i + cli.batch_size] for i in range(0, len(items), cli.batch_size)]
        batches = [data.collate(group, pad) for group in groups]
        fill = sum(len(e.input_ids) for e in items) / sum(b[0].numel() for b in batches)

    def step(batch) -> None:
        train.accumulate_gradients(model, None, [batch], chunk_size=cli.chunk_size, dp_group=None, params=params)
        train.clip_gradients(params, split, 1.0, fs_init.get_model_parallel_group())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_pass(step, batches, cli.repeats)
    record = {"data": lang, "config": f"ours {config}", "tp": parallel.tp_size, "steps": len(batches), "fill": fill,
              "real_tokens_per_s": sum(len(e.input_ids) for e in items) / seconds}
    distributed.teardown()
    return record if parallel.is_main else {}


def run_peft(lang: str, cli: argparse.Namespace) -> dict:
    """transformers + PEFT LoRA (r=8, alpha 16, the seven projections) on the same grouped padded batches."""
    import peft

    model, _ = hf_layers(cli.layers)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    items = examples(lang, cli)
    batches = [data.collate(group, 0) for group in grouped_batches(items, cli.batch_size)]

    def step(batch) -> None:
        ids, labels = batch
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_pass(step, batches, cli.repeats)
    fill = sum(len(e.input_ids) for e in items) / sum(b[0].numel() for b in batches)
    return {"data": lang, "config": "transformers + PEFT", "tp": 1, "steps": len(batches), "fill": fill,
            "real_tokens_per_s": sum(len(e.input_ids) for e in items) / seconds}


def hf_layers(layers: int):
    """hf_compare.hf_model's transformers Llama (random_model's weights at TP=1) with `layers` layers."""
    import bench.generate as generate
    from bench import hf_compare

    real = generate.shape_args
    hf_compare.shape_args = lambda shape, _layers, device: real(shape, layers, device)
    try:
        return hf_compare.hf_model("110M")
    finally:
        hf_compare.shape_args = real


def gathered_chunk_loss(output: ColumnParallelLinear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss before llama/tuning/loss.py: all-gather every rank's logits, then torch's cross-entropy."""
    return F.cross_entropy(output(hidden).float(), targets, reduction="sum")


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_loss_memory(config: str, cli: argparse.Namespace) -> dict:
    """Peak RSS of one loss forward + backward above what the rank holds before it."""
    vocab, dim = 128256, 4096
    if config == "transformers":
        from transformers.loss.loss_utils import ForCausalLMLoss

        head = torch.nn.Linear(dim, vocab, bias=False).requires_grad_(False)
        tp, is_main = 1, True
    else:
        parallel = distributed.setup()
        # gathered: the output head's forward gathers the logits (the model's own head); chunk_loss reads the slices
        head = ColumnParallelLinear(dim, vocab, parallel.tp_size, gather_output=True).requires_grad_(False).train()
        torch.nn.init.normal_(head.weight, std=dim**-0.5)
        tp, is_main = parallel.tp_size, parallel.is_main
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(cli.tokens, dim, generator=gen).requires_grad_(True)
    targets = torch.randint(0, vocab, (cli.tokens,), generator=gen)
    base = rss()
    reset_peak_memory(torch.device("cpu"))
    if config == "transformers":
        labels = torch.cat([torch.tensor([IGNORE_INDEX]), targets[:-1]])  # it shifts labels by one itself
        loss = ForCausalLMLoss(head(hidden).unsqueeze(0), labels.unsqueeze(0), vocab)
    else:
        fn = gathered_chunk_loss if config == "gathered" else chunk_loss
        loss = sum(checkpoint(fn, head, h, t, use_reentrant=False) for h, t in zip(hidden.split(cli.chunk_size), targets.split(cli.chunk_size)))
    loss.backward()
    record = {"config": config, "tp": tp, "loss_mib": (peak_memory(torch.device("cpu")) - base) / 2**20}
    if config != "transformers":
        distributed.teardown()
    return record if is_main else {}


def launch(one: str, tp: int, cli: argparse.Namespace, extra: list[str]) -> dict:
    """One configuration in a process (or torchrun job) of its own, so its peak RSS is its own."""
    threads = str(max(1, cli.threads // tp))
    launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp)]
    argv = [*launcher, __file__, "--one", one, *extra, "--threads", threads]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": threads}).stdout
    record = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    print(json.dumps(record), flush=True)
    return record


def forwarded(cli: argparse.Namespace) -> list[str]:
    return ["--examples", str(cli.examples), "--max_seq_len", str(cli.max_seq_len), "--batch_size", str(cli.batch_size),
            "--layers", str(cli.layers), "--repeats", str(cli.repeats), "--tokens", str(cli.tokens), "--chunk_size", str(cli.chunk_size)]


def throughput(cli: argparse.Namespace) -> None:
    records = []
    for lang in cli.data:
        mine = [launch("peft", 1, cli, [*forwarded(cli), "--data", lang])]
        for tp in cli.tp:
            for config in cli.ours:
                mine.append(launch(f"ours-{config}", tp, cli, [*forwarded(cli), "--data", lang]))
        peft_rate = mine[0]["real_tokens_per_s"]
        padded = {r["tp"]: r["real_tokens_per_s"] for r in mine if r["config"] == "ours padded"}
        padded = {tp: padded.get(tp) for tp in cli.tp}
        for r in mine:
            r["vs_peft"] = r["real_tokens_per_s"] / peft_rate
            r["vs_padded"] = r["real_tokens_per_s"] / padded[r["tp"]] if r["config"].startswith("ours") and padded[r["tp"]] else None
        records += mine
    print(f"# LoRA r=8, 110M shape with {cli.layers} layers, {cli.examples} alpaca examples (alpaca template, Llama 2 tokenizer, "
          f"max {cli.max_seq_len}), batch {cli.batch_size}, float32, {cli.threads} threads per configuration")
    print(format_table(records, THROUGHPUT), flush=True)


def loss_memory(cli: argparse.Namespace) -> None:
    records = [launch("loss-transformers", 1, cli, forwarded(cli))]
    for tp in cli.tp:
        for config in ("gathered", "vocab_parallel"):
            records.append(launch(f"loss-{config}", tp, cli, forwarded(cli)))
    tp1 = next(r["loss_mib"] for r in records if r["config"] == "gathered" and r["tp"] == 1)
    for r in records:
        same = next(g["loss_mib"] for g in records if g["config"] == "gathered" and g["tp"] == r["tp"]) if r["config"] != "transformers" else None
        r["vs_gathered"] = r["loss_mib"] / same if same else None
        r["vs_tp1"] = r["loss_mib"] / tp1
    print(f"# loss of {cli.tokens} positions, dim 4096, vocab 128256, float32; ours in chunks of {cli.chunk_size}")
    print(format_table(records, MEMORY), flush=True)


def main() -> None:
    cli = parse_args()
    if cli.one:
        torch.set_num_threads(cli.threads)
        if cli.one.startswith("loss-"):
            record = run_loss_memory(cli.one.removeprefix("loss-"), cli)
        elif cli.one == "peft":
            record = run_peft(cli.data[0], cli)
        else:
            record = run_ours(cli.one.removeprefix("ours-"), cli.data[0], cli)
        if record:
            print(json.dumps(record), flush=True)
        return
    if "throughput" in cli.part:
        throughput(cli)
    if "loss_memory" in cli.part:
        loss_memory(cli)


if __name__ == "__main__":
    run_cli(main)
