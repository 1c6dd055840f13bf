"""torchrun worker for test_llama3_model.py: Llama 3 checkpoints on 2 tensor-parallel ranks, one launch.

    torchrun --nproc_per_node 2 tests/llama3_worker.py --out DIR CKPT...

Every rank writes DIR/<ckpt dir name>.rank<R>.pt holding `outputs(...)`. The full logits of one
checkpoint are [320, 128256] float32 (160 MB), so only the columns `logit_columns` picks are
saved: every 16th id and the edges of each rank's half of the vocabulary.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when not pip-installed
from llama import distributed  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.formats.load import load_model  # noqa: E402
from llama.model import Transformer  # noqa: E402

VOCAB = 128256  # Llama 3's
# A few hundred positions: far enough that Llama 3.1's stretched low frequencies turn by a
# visibly different angle than the unscaled ones (see test_llama3_model.py).
TOKENS = torch.randint(0, VOCAB, (1, 320), generator=torch.Generator().manual_seed(1))


def logit_columns(vocab_size: int) -> torch.Tensor:
    """Every 16th id plus the first and last id of each of two halves (the TP=2 vocab slices)."""
    half = vocab_size // 2
    edges = torch.tensor([half - 1, half, vocab_size - 1])
    return torch.unique(torch.cat([torch.arange(0, vocab_size, 16), edges]))


def load(ckpt_dir: Path, parallel: distributed.Parallel, **spec) -> Transformer:
    """This rank's slice of a checkpoint, float32, cache for one row of TOKENS."""
    spec = LoadSpec(ckpt_dir, max_seq_len=TOKENS.size(1), max_batch_size=1, dtype=torch.float32, **spec)
    return load_model(spec, vocab_size=None, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)


def outputs(ckpt_dir: Path, parallel: distributed.Parallel) -> dict:
    """Logits of TOKENS at `logit_columns`, and whether the output layer holds exactly this
    rank's rows of the embedding (what a tied checkpoint must give)."""
    model = load(ckpt_dir, parallel)
    with torch.inference_mode():
        logits = model(TOKENS.to(parallel.device))[0].cpu()
    return {
        "logits": logits[:, logit_columns(logits.size(-1))].clone(),
        "output_is_embedding": torch.equal(model.output.weight, model.tok_embeddings.weight),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("ckpts", type=Path, nargs="+")
    args = parser.parse_args()
    parallel = distributed.setup()
    for ckpt_dir in args.ckpts:
        torch.save(outputs(ckpt_dir, parallel), args.out / f"{ckpt_dir.name}.rank{parallel.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main()
