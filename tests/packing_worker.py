"""Worker for tests/test_packing.py: the same examples packed and one per row, for each method.

    torchrun --nproc_per_node 2 tests/packing_worker.py OUT_DIR      (TP=2)
    python tests/packing_worker.py OUT_DIR                          (1 rank; the test calls `run_all` in-process)

For prompt, LoRA and full tuning, ft_main.py's own functions load the model and data; the first
EXAMPLES training examples go through `train.summed_loss` once as padded rows (data.collate, one
example per row) and once packed (llama/tuning/packing.py), each followed by a backward. The held-out
set is evaluated with `train.estimate_loss` both ways, with the method's prompt (if any) and
without. Each rank saves OUT_DIR/<method>_rank<R>.pt for the test to compare.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ft_main.py lives at the repo root

import torch  # noqa: E402

import ft_main  # noqa: E402
from llama import distributed, lora  # noqa: E402
from llama.formats import layout  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402
from llama.tuning import data, packing, train  # noqa: E402

METHODS = ("prompt", "lora", "full")
EXAMPLES = 12
CHUNK = 64  # several loss chunks per batch
SHORT = 160  # the packed examples are at most this long, so rows of 512 hold several
# plain template: the stories260K tokenizer's examples run ~80..1000 tokens (10th..90th percentile)
ARGS = ["--template", "plain", "--max_seq_len", "512", "--max_examples", "120", "--val_fraction", "0.1", "--n_virtual_tokens", "8",
        "--batch_size", "3", "--lora_targets", ",".join(lora.TARGETS)]


def loss_and_grads(run: ft_main.Run, batch: tuple) -> dict:
    """Summed token loss of one batch and the trained tensors' gradients (this rank's slices)."""
    params = run.method.named_trainable()
    for _, param in params:
        param.grad = None
    input_ids, labels, layout = train.to_device(batch, torch.device("cpu"))
    loss = train.summed_loss(run.model, run.method.prompt, input_ids, labels, chunk_size=CHUNK, layout=layout)
    loss.backward()
    return {"loss": loss.detach(), "labels": train.count_label_tokens(labels), "grads": {name: p.grad.clone() for name, p in params}}


def give_lora_b_values(model, parallel: distributed.Parallel) -> None:
    """LoRA starts with B = 0, which makes A's gradient 0; seeded full B tensors, of which each rank
    takes its slice, make it count (the same adapter on any number of ranks)."""
    gen = torch.Generator().manual_seed(1)
    for name, param in sorted(lora.local_state(model).items()):
        if name.endswith(".B"):
            dim = layout.tensor_split_dim(name)
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= parallel.tp_size
            full = torch.randn(shape, generator=gen) * 0.05
            param.data.copy_(full if dim is None else full.chunk(parallel.tp_size, dim)[parallel.tp_rank])


def compare(method: str, out_dir: Path, parallel: distributed.Parallel) -> None:
    config, _ = ft_main.parse_args([*ARGS, "--method", method, "--out_dir", str(out_dir / method)])
    run = ft_main.prepare(config, parallel, None)
    if method == "lora":
        give_lora_b_values(run.model, parallel)
    splits = data.build_splits(config.data, load_tokenizer(config.model.tokenizer_path), template=config.template,
                               max_seq_len=config.model.max_seq_len, val_fraction=config.val_fraction, seed=config.seed,
                               max_examples=config.max_examples)
    pad_id, capacity = run.batches.pad_id, run.method.positions()
    n_virtual = config.n_virtual_tokens if method == "prompt" else 0
    examples = [e for e in splits.train if len(e.input_ids) <= SHORT][:EXAMPLES]
    rows = packing.pack_rows([n_virtual + len(e.input_ids) for e in examples], capacity)
    padded = loss_and_grads(run, data.collate(examples, pad_id))
    packed = loss_and_grads(run, packing.collate_rows([[examples[i] for i in row] for row in rows], pad_id, n_virtual))
    evaluate = lambda prompt, batches: train.estimate_loss(run.model, prompt, batches, chunk_size=CHUNK, dp_group=parallel.dp_group)[0]  # noqa: E731
    ranks = {"dp_rank": parallel.dp_rank, "dp_size": parallel.dp_size}
    val_padded = train.eval_batches(splits.val, config.batch_size, **ranks, pad_id=pad_id)
    val_packed = packing.eval_batches(splits.val, config.batch_size, **ranks, capacity=capacity, pad_id=pad_id, n_virtual=n_virtual)
    bare_packed = packing.eval_batches(splits.val, config.batch_size, **ranks, capacity=capacity, pad_id=pad_id, n_virtual=0)
    evals = {"padded": evaluate(run.method.prompt, val_padded), "packed": evaluate(run.method.prompt, val_packed),
             "bare_padded": evaluate(None, val_padded), "bare_packed": evaluate(None, bare_packed)}
    torch.save({"padded": padded, "packed": packed, "rows": len(rows), "eval": evals, "val_rows": sum(len(b[0]) for b in val_packed)},
               out_dir / f"{method}_rank{parallel.rank}.pt")


def run_all(out_dir: Path) -> None:
    """Every method on this process group's ranks (all of them tensor-parallel)."""
    parallel = distributed.setup()
    try:
        for method in METHODS:
            compare(method, out_dir, parallel)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))
