"""torchrun worker for tests/test_vocab_parallel_loss.py: the vocabulary-parallel loss on TP=4, then TP=2.

    torchrun --nproc_per_node 4 tests/vocab_loss_worker.py OUT_DIR

Every rank makes the same weight W [V, dim], hidden states [N, dim] and targets (seeded, see
`problem`), holds its vocabulary slice of W in the project's column-parallel output layer, and
runs llama.tuning.loss.chunk_loss on each chunk; rank R of layout tpT saves {"losses", "hidden_grad",
"weight_grad"} to OUT_DIR/tpT_rank<R>.pt for the test to compare with torch's cross-entropy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's llama

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fairscale.nn.model_parallel import initialize as fs_init  # noqa: E402

from llama import distributed  # noqa: E402
from llama.parallel import ColumnParallelLinear  # noqa: E402
from llama.tuning.data import IGNORE_INDEX  # noqa: E402
from llama.tuning.loss import chunk_loss  # noqa: E402

VOCAB, DIM, CHUNK = 512, 64, 16
CHUNKS = 4  # the third is all IGNORE_INDEX


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [V, dim], hidden [N, dim], targets [N]: a few ignored targets, one chunk with only ignored ones."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, DIM, generator=gen) / DIM**0.5 * 3  # logits of std ~3, as a trained head gives
    hidden = torch.randn(CHUNK * CHUNKS, DIM, generator=gen)
    targets = torch.randint(0, VOCAB, (CHUNK * CHUNKS,), generator=gen)
    targets[::5] = IGNORE_INDEX
    targets[2 * CHUNK : 3 * CHUNK] = IGNORE_INDEX
    return weight, hidden, targets


def run(out_dir: Path, tp: int) -> None:
    parallel = distributed.setup(tp)
    weight, hidden, targets = problem()
    output = ColumnParallelLinear(DIM, VOCAB, tp).train()  # training mode: the layer's collectives carry gradients
    rows = VOCAB // tp
    output.weight.data.copy_(weight[parallel.tp_rank * rows : (parallel.tp_rank + 1) * rows])
    hidden = hidden.clone().requires_grad_(True)
    losses = [chunk_loss(output, h, t) for h, t in zip(hidden.split(CHUNK), targets.split(CHUNK))]
    torch.stack(losses).sum().backward()
    torch.save({"losses": torch.stack(losses).detach(), "hidden_grad": hidden.grad, "weight_grad": output.weight.grad},
               out_dir / f"tp{tp}_rank{parallel.rank}.pt")
    fs_init.destroy_model_parallel()


def main() -> None:
    out_dir = Path(sys.argv[1])
    try:
        for tp in (4, 2):
            run(out_dir, tp)
    finally:
        distributed.teardown()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
