"""Per-pair DPO values of a finished ft_main.py --objective dpo run, through the run's own code, on 1 or 2 tensor-parallel ranks.

    torchrun --nproc_per_node 2 tests/dpo_runs_worker.py jobs.json

`pair_values(run_dir, parallel)` rebuilds the run as `--resume` would (its run_config.json, the
method's files in the folder: adapter.pt, prompt.pt, model/; full tuning's reference_logps.pt) on
whatever ranks `parallel` has, and returns, per held-out pair in the run's order, the policy's and the
reference's summed log-probabilities, the loss and the rewards (llama/tuning/objective.py and
llama/tuning/dpo.py, as the run's evaluation computes them), with the token rows they came from.
tests/test_dpo_runs.py calls it on one rank and compares with transformers + PEFT.

jobs.json is a list of {"kind": "ft_main", "argv": [...]} (a training run; the process group stays
up between jobs, only fairscale's model-parallel groups are rebuilt, as tests/ft_worker.py does) or
{"kind": "pairs", "run": RUN_DIR, "tp": N, "out": FILE} (rank 0 saves pair_values to FILE).
"""

import json
import sys
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts live at the repo root

import torch  # noqa: E402

import ft_main  # noqa: E402
from ft_worker import drop_model_parallel_groups  # noqa: E402
from llama import distributed  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402
from llama.tuning import config as run_config  # noqa: E402
from llama.tuning import dpo, methods  # noqa: E402
from llama.tuning.prompt import load_prompt  # noqa: E402


def pair_values(run_dir: Path, parallel: distributed.Parallel) -> dict[str, torch.Tensor]:
    """{policy_chosen, policy_rejected, reference_chosen, reference_rejected, losses, rewards_chosen,
    rewards_rejected: [M] float32; input_ids, labels: [2M, T] (chosen rows, then rejected rows)} of
    the run's M held-out pairs, every rank holding the same values (this process's only data-parallel rank)."""
    config = run_config.load(run_dir)
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    method = methods.make_method(config, parallel)
    model = method.build(tokenizer, None if config.method == "prompt" else run_dir)  # lora: adapter.pt; full: model/
    if method.prompt is not None:
        method.prompt.weight.data.copy_(load_prompt(run_dir / "prompt.pt").weight)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    goal, _, val_batches = ft_main.preference_data(config, method, tokenizer, pad_id, {}, nullcontext, fresh=False)
    model.eval()
    s = goal.settings
    columns, width = defaultdict(list), max(batch[0].size(1) for batch in val_batches)
    with torch.no_grad():
        for batch in val_batches:
            input_ids, labels, _ = batch
            chosen, rejected = goal.logps(input_ids, labels)
            ref_chosen, ref_rejected = goal.reference_logps(batch, "val")
            losses, rewards_chosen, rewards_rejected = dpo.preference_losses(
                chosen, rejected, ref_chosen, ref_rejected, loss_type=s.loss, beta=s.beta, label_smoothing=s.label_smoothing)
            for name, value in [("policy_chosen", chosen), ("policy_rejected", rejected), ("reference_chosen", ref_chosen),
                                ("reference_rejected", ref_rejected), ("losses", losses), ("rewards_chosen", rewards_chosen),
                                ("rewards_rejected", rewards_rejected)]:
                columns[name].append(value.float().cpu())
            columns["rows"].append((input_ids.cpu(), labels.cpu()))
    values = {name: torch.cat(parts) for name, parts in columns.items() if name != "rows"}
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, width - t.size(1)), value=fill)  # noqa: E731
    chosen_rows = [(pad(ids.chunk(2)[0], pad_id), pad(lab.chunk(2)[0], -100)) for ids, lab in columns["rows"]]
    rejected_rows = [(pad(ids.chunk(2)[1], pad_id), pad(lab.chunk(2)[1], -100)) for ids, lab in columns["rows"]]
    values["input_ids"] = torch.cat([ids for ids, _ in chosen_rows + rejected_rows])
    values["labels"] = torch.cat([lab for _, lab in chosen_rows + rejected_rows])
    return values


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    real_teardown, distributed.teardown = distributed.teardown, drop_model_parallel_groups
    try:
        for job in jobs:
            if job["kind"] == "ft_main":
                ft_main.main(job["argv"])
            else:
                parallel = distributed.setup(job["tp"])
                values = pair_values(Path(job["run"]), parallel)
                if parallel.is_main:
                    torch.save(values, job["out"])
                drop_model_parallel_groups()
    finally:
        real_teardown()


if __name__ == "__main__":
    main()
