"""Sequence packing (`ft_main.py --pack`): several whole examples per row, each attending only to itself.

Alpaca-style examples are short and uneven, so padded batches spend much of every step on pad
positions. Packing fills rows of `capacity` slots (--max_seq_len, plus the soft prompt's rows
under prompt tuning) with whole examples, never splitting one:

- `pack_rows`: best-fit decreasing bin packing (the longest example first, each into the row it
  fills best), which leaves only a few percent of a row empty on the bundled data;
- `collate_rows`: per slot the token, its label, its RoPE position (0 at every example's first
  slot) and its example index in the row; the first label of every example is IGNORE_INDEX, so
  the last token of one example never learns to predict the next one, and the label count (the
  loss normaliser) is exactly the unpacked one;
- `Layout.attention_mask`: a block-diagonal causal boolean mask for scaled_dot_product_attention.

Why a mask and not one forward per example: a row is still one batch of large GEMMs (the
projections and the MLP, which dominate a step), and masked scores get exactly zero weight, so
the result is the unpacked one up to float summation order. The price is attention over
capacity^2 scores per row instead of the sum of each example's squared length, small next to
the GEMMs at these lengths; per-example forwards would cost a kernel launch per example and layer.
The padding after a row's last example is one more "example" of its own, so every query sees at
least itself (a query that sees nothing would make softmax NaN); its labels are all ignored.

Prompt tuning packs too: every example gets its own soft prompt, n_virtual slots right before its
tokens at positions 0..P-1 (the unpacked layout), filled with the prompt's rows by
`hidden_states`; the slots cost capacity, so rows hold P + max_seq_len slots.
"""

import bisect
import random
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from llama.errors import UserError
from llama.tuning.data import IGNORE_INDEX, Example


@dataclass
class Layout:
    """Where each example sits in a batch of packed rows (all [B, T], on the batch's device)."""

    positions: torch.Tensor
    """RoPE position of each slot: 0 at every example's first slot (its first virtual token under prompt tuning)."""
    documents: torch.Tensor
    """Index of the slot's example within its row; the padding tail counts as one more example."""
    virtual: Optional[torch.Tensor] = None
    """Prompt tuning: which soft-prompt row fills the slot, -1 for a token slot."""

    def to(self, device) -> "Layout":
        return replace(self, **{name: None if t is None else t.to(device) for name, t in vars(self).items()})

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, T, T] boolean, True where query i may see key j: same example and j <= i."""
        width = self.documents.size(1)
        same = self.documents.unsqueeze(2) == self.documents.unsqueeze(1)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.documents.device).tril()
        return (same & causal).unsqueeze(1)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each row: best-fit decreasing, items in a row in the order placed.

    Ties in length keep the order given, so a shuffled order gives a different packing per epoch.
    """
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise UserError(f"an example of {max(too_long)} slots does not fit a packed row of {capacity}; raise --max_seq_len")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first with room >= n fits n best
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([])
            room, row = capacity, len(rows) - 1
        else:
            room, row = free.pop(k)
        rows[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], row))
    return rows


def fill_rate(rows: Sequence[Sequence[int]], lengths: Sequence[int], capacity: int) -> float:
    """Share of the rows' slots that hold an example's slot (not padding)."""
    return sum(lengths[i] for row in rows for i in row) / max(1, len(rows) * capacity)


def collate_rows(rows: Sequence[Sequence[Example]], pad_id: int, n_virtual: int = 0) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """input_ids, labels and Layout [B, T] of packed rows, T the longest row's slots.

    Each example is laid out as unpacked: n_virtual soft-prompt slots, then its tokens, at
    positions 0, 1, ...; then the row is padded (pad_id, IGNORE_INDEX, a document of its own).
    """
    width = max(sum(n_virtual + len(e.input_ids) for e in row) for row in rows)
    columns = [_row_columns(row, pad_id, n_virtual, width) for row in rows]
    ids, labels, positions, documents, virtual = (torch.tensor([row[k] for row in columns], dtype=torch.long) for k in range(5))
    return ids, labels, Layout(positions, documents, virtual if n_virtual else None)


def _row_columns(row: Sequence[Example], pad_id: int, n_virtual: int, width: int) -> tuple[list[int], ...]:
    """(ids, labels, positions, documents, virtual) of one packed row, padded to width."""
    ids, labels, positions, documents, virtual = [], [], [], [], []
    for doc, example in enumerate(row):
        n = n_virtual + len(example.input_ids)
        ids += [pad_id] * n_virtual + example.input_ids
        labels += [IGNORE_INDEX] * (n_virtual + 1) + example.labels[1:]  # no target crosses into this example
        positions += range(n)
        documents += [doc] * n
        virtual += [*range(n_virtual), *[-1] * len(example.input_ids)]
    pad = width - len(ids)
    return (ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, positions + list(range(pad)),
            documents + [len(row)] * pad, virtual + [-1] * pad)


def packed_hidden_states(model, prompt, input_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The model's final-norm hidden states [B, T, dim] of packed rows; the soft prompt's rows
    (if any) fill the virtual slots, so each example sees the prompt as it would unpacked."""
    embeds = None
    if layout.virtual is not None:
        if prompt is None:
            raise ValueError("packed rows with soft-prompt slots need the prompt (pack without slots for the bare model)")
        embeds = model.tok_embeddings(input_ids)
        rows = prompt.weight[layout.virtual.clamp(min=0)].to(embeds.dtype)
        embeds = torch.where((layout.virtual >= 0).unsqueeze(-1), rows, embeds)
    elif prompt is not None:
        raise ValueError("prompt tuning needs packed rows with soft-prompt slots (n_virtual)")
    return model.hidden_states(input_ids, positions=layout.positions, mask=layout.attention_mask(), embeds=embeds)


def epoch_rows(lengths: Sequence[int], capacity: int, batch_size: int, *, seed: int, epoch: int,
               dp_rank: int = 0, dp_size: int = 1) -> list[list[list[int]]]:
    """This data-parallel rank's batches of packed rows (example indices) for one epoch.

    A pure function of (seed, epoch) like data.batch_indices: the examples are shuffled, packed,
    the rows shuffled, and each step's global batch of batch_size x dp_size rows is cut into one
    slice per data-parallel rank (the tail that fills no global batch is dropped).
    """
    rng = random.Random(f"packed-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = [[order[k] for k in row] for row in pack_rows([lengths[i] for i in order], capacity)]
    rng.shuffle(rows)
    global_size = batch_size * dp_size
    if len(rows) < global_size:
        raise UserError(f"{len(lengths)} training examples pack into {len(rows)} rows of {capacity} slots, which cannot fill one "
                        f"batch of {batch_size} rows x {dp_size} data-parallel ranks; lower the batch size or add data")
    rows = rows[: len(rows) // global_size * global_size]
    return [rows[start + dp_rank * batch_size : start + (dp_rank + 1) * batch_size] for start in range(0, len(rows), global_size)]


class PackedBatches:
    """train.TrainBatches for packed rows: (epoch, position) is the whole state, so resume is exact."""

    def __init__(self, examples: Sequence[Example], batch_size: int, *, seed: int, dp_rank: int, dp_size: int, capacity: int,
                 pad_id: int, n_virtual: int = 0, epoch: int = 0, position: int = 0):
        self.examples, self.pad_id, self.n_virtual, self.capacity = examples, pad_id, n_virtual, capacity
        self.slots = [n_virtual + len(example.input_ids) for example in examples]
        self.order = lambda epoch: epoch_rows(self.slots, capacity, batch_size, seed=seed, epoch=epoch, dp_rank=dp_rank, dp_size=dp_size)
        self.epoch, self.position = epoch, position
        self.batches = self.order(epoch)

    def next(self):
        """The next batch (input_ids, labels, Layout) and its number of real (example) tokens."""
        if self.position == len(self.batches):
            self.epoch, self.position = self.epoch + 1, 0
            self.batches = self.order(self.epoch)
        rows = self.batches[self.position]
        self.position += 1
        examples = [[self.examples[i] for i in row] for row in rows]
        return collate_rows(examples, self.pad_id, self.n_virtual), sum(len(e.input_ids) for row in examples for e in row)

    def fill_rate(self) -> float:
        """Share of this epoch's row slots holding an example (before the dropped tail)."""
        return fill_rate([row for batch in self.batches for row in batch], self.slots, self.capacity)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def eval_batches(examples: Sequence[Example], batch_size: int, *, dp_rank: int, dp_size: int, capacity: int, pad_id: int,
                 n_virtual: int = 0, limit: int = 0) -> list:
    """This data-parallel rank's held-out examples as batches of packed rows (deterministic).

    `limit` counts unpacked batches (limit x batch_size examples), so --eval_batches evaluates the
    same examples with and without --pack, and the loss is the same.
    """
    mine = examples[dp_rank::dp_size]
    mine = mine[: limit * batch_size] if limit else mine
    rows = pack_rows([n_virtual + len(e.input_ids) for e in mine], capacity)
    return [collate_rows([[mine[i] for i in row] for row in rows[start : start + batch_size]], pad_id, n_virtual)
            for start in range(0, len(rows), batch_size)]
