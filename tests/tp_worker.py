"""torchrun worker for test_tp.py: several checkpoints at several tensor-parallel sizes, one launch.

    torchrun --nproc_per_node 4 tests/tp_worker.py --out DIR --tp 4,2 --tokenizer TOK \
        --generate CKPT... --logits_only CKPT...

For each TP size (the world splits into world/TP data-parallel replicas, each a full TP group)
and each checkpoint, every rank writes DIR/<ckpt dir name>.tp<N>.rank<R>.pt holding `outputs(...)`.
test_tp.py computes the same on one rank and compares. Generation is many small collectives,
slow with 4 processes on 2 cores, so it runs only on the --generate checkpoints.
"""

import argparse
import sys
from pathlib import Path

import torch
from fairscale.nn.model_parallel import initialize as fs_init

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when not pip-installed
from llama import distributed  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.engine import Request  # noqa: E402
from llama.formats import load  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.sampling import Sampling  # noqa: E402
from llama.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

# Fixed inputs: a batch for full-forward logits, and prompts of different lengths for generation.
LOGIT_TOKENS = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(0))
PROMPTS = [[1], [1, 403, 407, 261, 378], [1, 317, 269, 274, 287, 263, 377]]
GEN_LEN, SEED = 16, 5


QUEUED = [Sampling(max_tokens=GEN_LEN, seed=SEED + i) for i in range(len(PROMPTS))] + [
    Sampling(max_tokens=GEN_LEN, temperature=1.0, top_p=0.9, seed=SEED + i) for i in range(len(PROMPTS))]
"""Each prompt greedy and sampled with its own seed: generated together on fewer rows, or each alone."""


def outputs(ckpt_dir: Path, tokenizer: Tokenizer, parallel: distributed.Parallel, generate: bool = True, rows: int = len(PROMPTS)) -> dict:
    """All-position logits and, if `generate`, greedy and top-p sampled ids of one checkpoint on this rank;
    "queued": the QUEUED requests generated together on `rows` cache rows (each alone when rows is 1).
    Generation runs on the model as Llama.build loads it (wq|wk|wv and w1|w3 fused), the logits on the
    separate layers (fusing changes the summation order of those products)."""
    spec = LoadSpec(ckpt_dir, max_seq_len=64, max_batch_size=len(PROMPTS), dtype=torch.float32)
    model = load.load_model(spec, vocab_size=tokenizer.n_words, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
    with torch.inference_mode():
        result = {"logits": model(LOGIT_TOKENS.to(parallel.device), 0).cpu()}
    if generate:
        model = load.load_model(spec, vocab_size=tokenizer.n_words, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size,
                                inference=True)
        result["greedy"] = [c.ids for c in Llama(model, tokenizer, parallel, seed=SEED).generate(PROMPTS, Sampling(max_tokens=GEN_LEN))]
        sampled = Llama(model, tokenizer, parallel, seed=SEED).generate(PROMPTS, Sampling(max_tokens=GEN_LEN, temperature=1.0, top_p=0.9))
        result["sampled"] = [c.ids for c in sampled]
        model.setup_caches(rows, 64)
        engine = Llama(model, tokenizer, parallel, seed=SEED).engine
        requests = [Request(prompt, setting) for setting, prompt in zip(QUEUED, PROMPTS * 2)]
        result["queued"] = [c.ids for c in engine.generate(requests)] if rows > 1 else [engine.generate([r])[0].ids for r in requests]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", required=True, help="comma-separated TP sizes, each dividing the world size")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--generate", type=Path, nargs="*", default=[], help="checkpoints to run logits and generation on")
    parser.add_argument("--logits_only", type=Path, nargs="*", default=[], help="checkpoints to run logits on")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    jobs = [(path, True) for path in args.generate] + [(path, False) for path in args.logits_only]
    for tp in map(int, args.tp.split(",")):
        parallel = distributed.setup(tp)
        for ckpt_dir, generate in jobs:
            result = outputs(ckpt_dir, tokenizer, parallel, generate, rows=2)
            torch.save(result, args.out / f"{ckpt_dir.name}.tp{tp}.rank{parallel.rank}.pt")
        fs_init.destroy_model_parallel()  # the next size builds new groups on the same processes
    distributed.teardown()


if __name__ == "__main__":
    main()
