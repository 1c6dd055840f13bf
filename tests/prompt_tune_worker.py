"""torchrun worker for tests/test_ft_main.py: prompt tuning with ft_main.py's own functions on N ranks.

    torchrun --nproc_per_node 2 tests/prompt_tune_worker.py <ft_main.py options>

First one optimizer step's worth of gradient is computed on the first training batch (the
replicated prompt must get the same gradient on every tensor-parallel rank), then ft_main.main
runs the whole job with the same options. Each rank saves {"grad", "prompt"} to
<out_dir>/rank<R>.pt so the test can compare ranks with each other and with a 1-rank run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ft_main.py lives at the repo root

import torch  # noqa: E402

import ft_main  # noqa: E402
from llama import distributed  # noqa: E402
from llama.tuning import train  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    config, _ = ft_main.parse_args(argv)
    parallel = distributed.setup(config.tp)
    run = ft_main.prepare(config, parallel, None)
    micro_batches = [run.batches.next()[0] for _ in range(config.grad_accum)]
    train.accumulate_gradients(run.model, run.method.prompt, micro_batches, chunk_size=config.chunk_size, dp_group=parallel.dp_group)
    grad = run.method.prompt.weight.grad.clone()
    method = ft_main.main(argv)  # joins the same process group, tears it down at the end
    torch.save({"grad": grad, "prompt": method.prompt.weight.detach().clone()}, config.out_dir / f"rank{parallel.rank}.pt")


if __name__ == "__main__":
    main()
