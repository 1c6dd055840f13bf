"""What a tuning run minimises (`--objective`): SFT's token loss, or DPO's preference loss, over a method's forward.

Both give the loop (ft_main.py) the same two calls: `accumulate` (gradients of one optimizer step
over its micro-batches, and the step's figures for metrics.jsonl) and `evaluate` (the held-out
figures, named `eval_*`). What trains, and its forward, is the method's (llama/tuning/methods.py).

DPO (llama/tuning/dpo.py) needs the reference model's log-probabilities of every pair. The
reference is the model before training, and a second copy does not fit the cards this project is
for, so: LoRA runs the same model with its adapters switched off, under no_grad; prompt tuning runs
it with the soft prompt as it started (`init_prompt` gives it again from the seed, so a resumed run
has it too: [n_virtual_tokens, dim] numbers, not a second model); full tuning, whose trained
weights *are* the model, computes the
reference log-probabilities of every train and held-out pair once before the first step, one pass
split over the data-parallel ranks, and keeps them in the run folder (`reference_logps.pt`), so a
resumed run reads them instead of recomputing them from weights that have moved.
"""

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from llama.files import atomic_torch_save, load_file
from llama.tuning import dpo, train
from llama.tuning.dpo import DPOConfig
from llama.tuning.preference import Pair, collate_pairs
from llama.tuning.prompt import SoftPrompt

REFERENCE = "reference_logps.pt"
Autocast = Callable[[], AbstractContextManager]


class SFT:
    """Next-token cross-entropy of the response tokens (llama/tuning/train.py)."""

    name = "sft"

    def __init__(self, method, chunk_size: int):
        self.method, self.chunk_size = method, chunk_size

    def accumulate(self, micro_batches, *, dp_group, autocast: Autocast, scale) -> tuple[float, dict]:
        loss, n_labels = self.method.accumulate(micro_batches, chunk_size=self.chunk_size, dp_group=dp_group, autocast=autocast, scale=scale)
        return loss, {"label_tokens": n_labels}

    def evaluate(self, batches, *, dp_group, autocast: Autocast) -> dict:
        loss, ppl = self.method.evaluate(batches, chunk_size=self.chunk_size, dp_group=dp_group, autocast=autocast)
        return {"eval_loss": loss, "eval_ppl": ppl}


class DPO:
    """The preference loss of pairs (chosen and rejected in one forward), against the reference model."""

    name = "dpo"

    def __init__(self, method, settings: DPOConfig, chunk_size: int, reference: Optional[dict[str, torch.Tensor]] = None,
                 reference_prompt: Optional[SoftPrompt] = None):
        self.method, self.settings, self.chunk_size = method, settings, chunk_size
        self.reference = reference
        """Full tuning: {"train": [N, 2], "val": [M, 2]} reference log-probs (chosen, rejected) per pair index."""
        self.reference_prompt = reference_prompt
        """Prompt tuning: the soft prompt as it started, frozen. The reference must be the policy at step 0
        (DPO's loss is then ln 2 and its rewards 0): the model *without* a prompt is not, since the
        initial prompt (text or vocabulary embeddings) already moves every log-probability."""

    def logps(self, input_ids: torch.Tensor, labels: torch.Tensor, tuned: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probabilities (chosen [B], rejected [B]) of a collated batch [2B, T]:
        the policy's, or (`tuned` False) the reference model's."""
        if not tuned and self.reference_prompt is not None:
            hidden = train.batch_hidden_states(self.method.model, self.reference_prompt, input_ids, None)
        else:
            hidden = self.method.hidden_states(input_ids, tuned)
        both = dpo.sequence_logps(self.method.model.output, hidden, labels, self.chunk_size)
        return both.chunk(2)

    def reference_logps(self, batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels, indices = batch
        if self.reference is not None:
            table = self.reference[split][indices]
            return table[:, 0].to(input_ids.device), table[:, 1].to(input_ids.device)
        with torch.no_grad():
            return self.logps(input_ids, labels, tuned=False)

    def pair_losses(self, batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses [B] with gradients, metric sums) of one batch of pairs."""
        device = self.method.model.tok_embeddings.weight.device
        batch = tuple(t.to(device) for t in batch)
        ref_chosen, ref_rejected = self.reference_logps(batch, split)
        chosen, rejected = self.logps(batch[0], batch[1])
        s = self.settings
        lengths = dpo.response_lengths(batch[1]).chunk(2) if s.loss == "ipo" else (None, None)
        losses, chosen_rewards, rejected_rewards = dpo.preference_losses(
            chosen, rejected, ref_chosen, ref_rejected, loss_type=s.loss, beta=s.beta, label_smoothing=s.label_smoothing,
            chosen_lengths=lengths[0], rejected_lengths=lengths[1])
        return losses, dpo.metric_sums(losses, chosen_rewards, rejected_rewards, chosen, rejected)

    def accumulate(self, micro_batches, *, dp_group, autocast: Autocast, scale) -> tuple[float, dict]:
        """Gradients of the mean pair loss over every pair of the step (all micro-batches, all
        data-parallel ranks: counted first, as SFT counts label tokens), and TRL's metrics of those pairs."""
        params = self.method.trainable()
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        device = params[0].device
        n_pairs = train.all_reduce_sum(torch.tensor(float(sum(b[2].numel() for b in micro_batches)), device=device), dp_group)
        sums = torch.zeros(len(dpo.METRICS) + 1, dtype=torch.float64, device=device)
        for batch in micro_batches:
            with autocast():
                losses, batch_sums = self.pair_losses(batch, "train")
            scale(losses.sum() / n_pairs).backward()
            sums += batch_sums
        train.all_reduce_grads(params, dp_group)
        metrics = dpo.metric_means(train.all_reduce_sum(sums, dp_group))
        return metrics.pop("loss"), {**metrics, "pairs": int(n_pairs)}

    @torch.no_grad()
    def evaluate(self, batches, *, dp_group, autocast: Autocast) -> dict:
        """TRL's metrics over the held-out pairs of every data-parallel rank, each pair weighted equally (eval_*)."""
        model = self.method.model
        training = model.training
        model.eval()  # no dropout
        sums = torch.zeros(len(dpo.METRICS) + 1, dtype=torch.float64, device=model.tok_embeddings.weight.device)
        for batch in batches:
            with autocast():
                sums += self.pair_losses(batch, "val")[1]
        model.train(training)
        return dpo.metric_means(train.all_reduce_sum(sums, dp_group), prefix="eval_")


@torch.no_grad()
def reference_table(dpo_objective: DPO, splits: dict[str, Sequence[Pair]], *, batch_size: int, pad_id: int, dp_rank: int, dp_size: int,
                    dp_group, autocast: Autocast, show_progress: bool) -> dict[str, torch.Tensor]:
    """Reference log-probabilities [N, 2] (chosen, rejected) of every pair of each split, before training:
    data-parallel rank r computes batches r, r + D, ..., and a sum over the ranks (each pair filled by
    exactly one) gives every rank the whole table."""
    model = dpo_objective.method.model
    device = model.tok_embeddings.weight.device
    training = model.training
    model.eval()
    tables = {}
    for split, pairs in splits.items():
        table = torch.zeros(len(pairs), 2, dtype=torch.float32, device=device)
        starts = range(dp_rank * batch_size, len(pairs), dp_size * batch_size)
        for start in tqdm(starts, desc=f"reference log-probs ({split})", disable=not show_progress, leave=False):
            input_ids, labels = collate_pairs(pairs[start : start + batch_size], pad_id)
            with autocast():
                chosen, rejected = dpo_objective.logps(input_ids.to(device), labels.to(device))
            table[start : start + chosen.numel()] = torch.stack([chosen, rejected], dim=1).float()
        tables[split] = train.all_reduce_sum(table, dp_group).cpu()
    model.train(training)
    return tables


def save_reference(tables: dict[str, torch.Tensor], out_dir: Path) -> Path:
    return atomic_torch_save(tables, Path(out_dir) / REFERENCE)


def load_reference(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(out_dir) / REFERENCE, mmap=False)
