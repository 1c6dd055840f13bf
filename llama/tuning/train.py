"""The pieces of ft_main.py's training loop: schedule, loss, gradients, eval, checkpoints, metrics.

Each is a small named function so the loop reads top to bottom and the tests can check the
pieces the loop really uses (same loss whatever the chunking or gradient accumulation).
"""

import json
import math
import random
import resource
import sys
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama.errors import UserError
from llama.files import atomic_torch_save, atomic_write_text, load_file
from llama.model import Transformer
from llama.tuning import data, packing
from llama.tuning.data import IGNORE_INDEX
from llama.tuning.loss import chunk_loss
from llama.tuning.prompt import SoftPrompt

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [B, T], labels [B, T]; packed rows add a packing.Layout


class TrainBatches:
    """This data-parallel rank's training batches, epoch after epoch (reshuffled by seed and epoch).

    (epoch, position) is the whole state, so a checkpoint holding it resumes on the very next batch.
    """

    def __init__(self, examples: Sequence[data.Example], batch_size: int, *, seed: int, dp_rank: int, dp_size: int,
                 group_by_length: bool, pad_id: int, epoch: int = 0, position: int = 0):
        self.examples, self.pad_id = examples, pad_id
        self.lengths = [len(example.input_ids) for example in examples]
        self.order = partial(data.batch_indices, self.lengths, batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size, group_by_length=group_by_length)
        self.epoch, self.position = epoch, position
        self.batches = self.order(epoch=epoch)

    def next(self) -> tuple[Batch, int]:
        """The next padded batch and its number of real (non-pad) tokens."""
        if self.position == len(self.batches):
            self.epoch, self.position = self.epoch + 1, 0
            self.batches = self.order(epoch=self.epoch)
        indices = self.batches[self.position]
        self.position += 1
        return data.collate([self.examples[i] for i in indices], self.pad_id), sum(self.lengths[i] for i in indices)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def eval_batches(examples: Sequence[data.Example], batch_size: int, *, dp_rank: int, dp_size: int, pad_id: int, limit: int = 0) -> list[Batch]:
    """This data-parallel rank's share of the held-out examples, in order, as padded batches (limit 0 = all)."""
    mine = examples[dp_rank::dp_size]
    batches = [data.collate(mine[i : i + batch_size], pad_id) for i in range(0, len(mine), batch_size)]
    return batches[:limit] if limit else batches


def get_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup to `lr` over warmup_steps, then cosine decay to `min_lr` at decay_steps (step counts from 0)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that are predicted: position t predicts labels[t + 1], so the first label never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def chunked_cross_entropy(output: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Summed next-token cross-entropy of the labelled positions, `chunk_size` positions at a time.

    Only positions with a label are projected onto the vocabulary. Each chunk's float32
    logits [chunk, vocab] are recomputed in backward (activation checkpointing) instead of
    being kept, so at most one chunk's logits exist at a time: for a 32000-token vocabulary
    that is the difference between O(batch x seq x vocab) and O(chunk x vocab) memory. Under
    tensor parallelism each rank computes only its vocabulary slice (llama/tuning/loss.py), so that is
    O(chunk x vocab / tp) and no logits are gathered.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]  # [N, dim], [N]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(chunk_loss, output, h, t, use_reentrant=False)
        else:
            total = total + chunk_loss(output, h, t)
    return total


def summed_loss(model: Transformer, prompt: Optional[SoftPrompt], input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_size: int,
                layout: Optional[packing.Layout] = None) -> torch.Tensor:
    """Summed token loss of one micro-batch, with the soft prompt (if any) in front (positions 0..P-1);
    `layout` says where the examples sit in packed rows (each with its own prompt)."""
    return chunked_cross_entropy(model.output, batch_hidden_states(model, prompt, input_ids, layout), labels, chunk_size)


def batch_hidden_states(model: Transformer, prompt: Optional[SoftPrompt], input_ids: torch.Tensor, layout: Optional[packing.Layout]) -> torch.Tensor:
    """The model's final-norm hidden states of a padded batch (prompt in front) or of packed rows."""
    if layout is not None:
        return packing.packed_hidden_states(model, prompt, input_ids, layout)
    return model.hidden_states(input_ids, prefix=None if prompt is None else prompt(input_ids.size(0)))


def to_device(batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor, Optional[packing.Layout]]:
    """(input_ids, labels, layout or None) of a padded or packed batch, on `device`."""
    input_ids, labels, *layout = batch
    return input_ids.to(device), labels.to(device), layout[0].to(device) if layout else None


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over the data-parallel group (a no-op with one data-parallel rank)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_grads(params: Sequence[nn.Parameter], group, bucket_numel: int = 2**25) -> None:
    """Sum the gradients over the data-parallel group, a few large all-reduces instead of one per tensor.

    Gradients are copied into flat buckets of up to `bucket_numel` elements (same dtype), reduced,
    and copied back, as DDP does; with one data-parallel rank nothing happens.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    buckets: list[list[torch.Tensor]] = [[]]
    for grad in (p.grad for p in params):
        current = buckets[-1]
        if current and (sum(g.numel() for g in current) + grad.numel() > bucket_numel or grad.dtype != current[0].dtype):
            buckets.append(current := [])
        current.append(grad)
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for grad, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            grad.copy_(part.view_as(grad))


def global_grad_norm(params: Sequence[nn.Parameter], split: Sequence[bool], tp_group) -> torch.Tensor:
    """L2 norm of the whole model's gradient, the same on every rank.

    A tensor split over the tensor-parallel ranks contributes the sum of its slices' squares
    (all-reduced over the TP group); a replicated one is the same on every rank and counts once.
    """
    device = params[0].device
    squares = torch.zeros(2, device=device)  # split, replicated
    for param, is_split in zip(params, split):
        squares[0 if is_split else 1] += torch.linalg.vector_norm(param.grad.float()) ** 2
    if any(split) and dist.is_initialized() and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(squares[:1], op=dist.ReduceOp.SUM, group=tp_group)
    return squares.sum().sqrt()


def clip_gradients(params: Sequence[nn.Parameter], split: Sequence[bool], max_norm: float, tp_group=None) -> float:
    """Scale the gradients so their global norm is at most max_norm (0 = no clipping); returns the norm."""
    norm = global_grad_norm(params, split, tp_group)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def accumulate_gradients(
    model: Transformer,
    prompt: Optional[SoftPrompt],
    micro_batches: Sequence[Batch],
    *,
    chunk_size: int,
    dp_group=None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    params: Optional[Sequence[nn.Parameter]] = None,
) -> tuple[float, int]:
    """Fill the trained parameters' gradients for one optimizer step; return (mean token loss, label tokens).

    `params` are the trained parameters (default: the prompt's). The loss is the sum of token
    losses over every micro-batch on every data-parallel rank, divided by the number of label
    tokens in all of them. Counting first means each micro-batch is weighted by its real
    tokens, so batch 4 x accum 1 equals batch 2 x accum 2 exactly, and summing (not averaging)
    the gradients over data-parallel ranks gives the gradient of that global token mean. TP
    ranks of one group see the same batch; the parallel layers' backward gives each rank the
    gradient of its own slices, and the same gradient for the replicated tensors.
    """
    params = [prompt.weight] if params is None else list(params)
    device = model.tok_embeddings.weight.device
    n_labels = torch.tensor(float(sum(count_label_tokens(batch[1]) for batch in micro_batches)), device=device)
    n_labels = all_reduce_sum(n_labels, dp_group).clamp(min=1.0)
    total = torch.zeros((), device=device)
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for batch in micro_batches:
        input_ids, labels, layout = to_device(batch, device)
        with autocast():
            loss = summed_loss(model, prompt, input_ids, labels, chunk_size=chunk_size, layout=layout) / n_labels
        if loss.requires_grad:  # a micro-batch with no label token adds nothing
            scale(loss).backward()
        total += loss.detach()
    all_reduce_grads(params, dp_group)
    return float(all_reduce_sum(total, dp_group)), int(n_labels)


@torch.no_grad()
def estimate_loss(
    model: Transformer,
    prompt: Optional[SoftPrompt],
    batches: Sequence[Batch],
    *,
    chunk_size: int,
    dp_group=None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[float, float]:
    """(mean token loss, perplexity) over held-out batches of every data-parallel rank (no prompt: the model alone)."""
    device = model.tok_embeddings.weight.device
    sums = torch.zeros(2, device=device)  # loss sum, label tokens
    training = model.training
    model.eval()  # no dropout
    for batch in batches:
        input_ids, labels, layout = to_device(batch, device)
        with autocast():
            hidden = batch_hidden_states(model, prompt, input_ids, layout)
            sums[0] += chunked_cross_entropy(model.output, hidden, labels, chunk_size)
        sums[1] += count_label_tokens(labels)
    model.train(training)
    loss_sum, n_labels = all_reduce_sum(sums, dp_group).tolist()
    loss = loss_sum / max(n_labels, 1.0)
    return loss, math.exp(min(loss, 50.0))


def rng_state() -> dict:
    """Every random generator the run could touch, to resume it exactly."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.setstate needs tuples; a saved state may come back with lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


STATE = "state.pt"
"""A run's training state: step, schedule, data position, RNG states, what the method keeps on rank 0."""
OLD_STATE = "ckpt.pt"
"""Runs saved before run_config.json kept their state and options together here."""


def save_training_state(out_dir: Path, method_state: dict, *, schedule: dict, step: int, data_position: dict) -> Path:
    """Everything needed to continue exactly (besides run_config.json and the method's own files), atomically.

    `method_state` is what the fine-tuning method keeps in the shared file (the prompt and its
    optimizer; nothing for methods whose state is sharded over ranks in files of their own).
    """
    state = {**method_state, "scheduler": schedule, "step": step, "data": data_position, "rng": rng_state()}
    return atomic_torch_save(state, Path(out_dir) / STATE)


def load_training_state(out_dir: Path) -> dict:
    """The training state of the run in `out_dir` (weights only: no pickled code runs); a run saved
    before run_config.json existed is read from its ckpt.pt."""
    out_dir = Path(out_dir)
    for name in (STATE, OLD_STATE):
        if (out_dir / name).is_file():
            return load_file(out_dir / name, mmap=False)
    raise UserError(f"--resume: no training state at {out_dir / STATE}; start without --resume, or pass the --out_dir of the run to continue")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator high-water mark, or the RSS high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written, so a crash loses nothing; every
    record also goes to the run's `tracker` (TensorBoard, W&B: llama/tuning/tracking.py), if any."""

    tracker = None
    """Something with log(record) and close(): where else each record goes."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():  # drop what came after the checkpoint: the resumed run redoes it
            kept = [r for r in read_metrics(self.path) if r["step"] < resume_step or (r["step"] == resume_step and "loss" in r)]
            atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), self.path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
