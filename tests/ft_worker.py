"""torchrun worker for tests/test_ft_methods.py: several ft_main.py / example.py jobs in one launch.

    torchrun --nproc_per_node 2 tests/ft_worker.py jobs.json

jobs.json is a list of {"script": "ft_main" | "example" | "example_ft", "argv": [...], "stdout": path or null}.
The global process group stays up between jobs (one launch costs seconds); only fairscale's
model-parallel groups are rebuilt, so each job may choose its own --tp. After a training job
each rank saves its trained tensors to <out_dir>/rank<R>.pt so the test can compare ranks.
"""

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts live at the repo root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fairscale.nn.model_parallel import initialize as fs_init  # noqa: E402

import example  # noqa: E402
import example_ft  # noqa: E402
import ft_main  # noqa: E402
from llama import distributed  # noqa: E402


def drop_model_parallel_groups() -> None:
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    real_teardown, distributed.teardown = distributed.teardown, drop_model_parallel_groups
    try:
        for job in jobs:
            if job["script"] == "ft_main":
                method = ft_main.main(job["argv"])
                trained = {name: param.detach().clone() for name, param in method.named_trainable()}
                torch.save(trained, method.config.out_dir / f"rank{dist.get_rank()}.pt")
            else:
                with open(job["stdout"], "w") if dist.get_rank() == 0 else contextlib.nullcontext(sys.stdout) as out:
                    with contextlib.redirect_stdout(out):
                        (example if job["script"] == "example" else example_ft).main(job["argv"])
    finally:
        real_teardown()


if __name__ == "__main__":
    main()
