"""Plot a training run: `python -m llama.tuning.plot runs/prompt_tuning/metrics.jsonl [--out loss.png]`.

Panels against the optimizer step: train and eval loss (with the untuned model's eval loss as a
reference line), for a DPO run the reward margin and accuracy (train and held-out), and the
learning rate. matplotlib is an optional extra (`pip install -e .[plot]`); without it the command
says so and exits.
"""

import argparse
import io
import json
from pathlib import Path
from typing import Optional

from llama.errors import UserError, run_cli
from llama.files import atomic_write_bytes


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl records; a bad line is reported by its number."""
    if not path.is_file():
        raise UserError(f"{path} not found: pass the metrics.jsonl that ft_main.py wrote in its --out_dir")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from None
    if not any("loss" in r or "eval_loss" in r for r in records):
        raise UserError(f"{path} holds no loss records: is it a metrics.jsonl from ft_main.py?")
    return records


def plot(records: list[dict], out: Path) -> Path:
    """Write the PNG atomically (temporary name in the same directory, then rename)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib, an optional extra: pip install matplotlib (or pip install -e .[plot])") from None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    dpo = any("rewards/margins" in r for r in train)
    fig, axes = plt.subplots(4 if dpo else 2, 1, figsize=(8, 10 if dpo else 6), sharex=True, height_ratios=(3, 2, 2, 1) if dpo else (3, 1))
    loss_ax, lr_ax = axes[0], axes[-1]
    if dpo:
        for ax, name in zip(axes[1:3], ("rewards/margins", "rewards/accuracies")):
            ax.plot([r["step"] for r in train], [r[name] for r in train], lw=0.8, alpha=0.7, label=f"train {name}")
            ax.plot([r["step"] for r in evals], [r[f"eval_{name}"] for r in evals], "o-", label=f"eval {name}")
            ax.set_ylabel(name.split("/")[1])
            ax.legend()
            ax.grid(alpha=0.3)
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss")
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        untuned = evals[0].get("eval_loss_untuned")
        if untuned is not None:
            loss_ax.axhline(untuned, color="gray", ls="--", lw=1, label=f"untuned model ({untuned:.3f})")
    loss_ax.set_ylabel("loss (nats / token)")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(buffer.getvalue(), out)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl written by ft_main.py")
    parser.add_argument("--out", default=None, help="PNG path (default: next to metrics.jsonl, as metrics.png)")
    args = parser.parse_args(argv)
    path = Path(args.metrics)
    out = Path(args.out) if args.out else path.with_suffix(".png")
    print(f"wrote {plot(read_records(path), out)}")


if __name__ == "__main__":
    run_cli(main)
