"""torchrun worker for tests/test_dpo.py: sequence log-probabilities on 2 tensor-parallel ranks, then metrics over 2 data-parallel ranks.

    torchrun --nproc_per_node 2 tests/dpo_worker.py OUT_DIR

Phase 1 (tp=2): every rank builds the same head W [V, dim], hidden states and labels (`problem`),
holds its vocabulary slice of W in the project's column-parallel layer, computes
llama.tuning.dpo.sequence_logps and backpropagates sum(ROW_WEIGHTS * logps) (DPO's gradient is such
a signed, weighted sum over the rows); rank R saves {"logps", "hidden_grad", "weight_grad"} to
OUT_DIR/tp2_rank<R>.pt. Phase 2 (tp=1, dp=2): rank R takes pairs R, R+2, ... of `pair_logps`, sums
their metrics and all-reduces the sums over the data-parallel group; saves OUT_DIR/dp2_rank<R>.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's llama

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fairscale.nn.model_parallel import initialize as fs_init  # noqa: E402

from llama import distributed  # noqa: E402
from llama.parallel import ColumnParallelLinear  # noqa: E402
from llama.tuning import dpo, train  # noqa: E402
from llama.tuning.data import IGNORE_INDEX  # noqa: E402

VOCAB, DIM, ROWS, WIDTH, CHUNK = 256, 32, 6, 12, 5  # chunks of 5 cross row boundaries
ROW_WEIGHTS = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.25, -2.0])
N_PAIRS = 7


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [V, dim], hidden [rows, T, dim], labels [rows, T]: prompts of different lengths, right padding, one row with no label."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, DIM, generator=gen) / DIM**0.5 * 3  # logits of std ~3, as a trained head gives
    hidden = torch.randn(ROWS, WIDTH, DIM, generator=gen)
    labels = torch.randint(0, VOCAB, (ROWS, WIDTH), generator=gen)
    for row, (prompt, end) in enumerate([(3, 12), (5, 9), (2, 12), (7, 10), (4, 5), (6, 12)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, end:] = IGNORE_INDEX
    labels[4] = IGNORE_INDEX  # a response cut to nothing: its sum is exactly 0
    return weight, hidden, labels


def pair_logps() -> tuple[torch.Tensor, ...]:
    """policy chosen, policy rejected, reference chosen, reference rejected [N_PAIRS] (summed log-probabilities)."""
    gen = torch.Generator().manual_seed(1)
    return tuple(-torch.rand(N_PAIRS, generator=gen, dtype=torch.float32) * 40 for _ in range(4))


def sequence_phase(out_dir: Path) -> None:
    parallel = distributed.setup(2)
    weight, hidden, labels = problem()
    output = ColumnParallelLinear(DIM, VOCAB, tp=2)
    rows = VOCAB // 2
    output.weight.data.copy_(weight[parallel.tp_rank * rows : (parallel.tp_rank + 1) * rows])
    output.weight.requires_grad_(True)
    hidden = hidden.clone().requires_grad_(True)
    logps = dpo.sequence_logps(output, hidden, labels, CHUNK)
    (ROW_WEIGHTS * logps).sum().backward()
    torch.save({"logps": logps.detach(), "hidden_grad": hidden.grad, "weight_grad": output.weight.grad},
               out_dir / f"tp2_rank{parallel.rank}.pt")
    fs_init.destroy_model_parallel()


def metrics_phase(out_dir: Path) -> None:
    parallel = distributed.setup(1)
    mine = [t[parallel.dp_rank :: parallel.dp_size] for t in pair_logps()]
    losses, chosen_rewards, rejected_rewards = dpo.preference_losses(*mine, loss_type="sigmoid", beta=0.1)
    sums = dpo.metric_sums(losses, chosen_rewards, rejected_rewards, mine[0], mine[1])
    torch.save({"sums": train.all_reduce_sum(sums, parallel.dp_group)}, out_dir / f"dp2_rank{parallel.rank}.pt")
    fs_init.destroy_model_parallel()


def main() -> None:
    out_dir = Path(sys.argv[1])
    try:
        sequence_phase(out_dir)
        metrics_phase(out_dir)
    finally:
        distributed.teardown()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
