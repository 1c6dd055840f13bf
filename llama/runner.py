"""The runner: one `Step` executed on this rank's shard of the model (prefill a row, decode rows).

`llama/engine.py`'s scheduler writes each step; every tensor-parallel rank runs the same one here,
and the forward's collectives pair the ranks up. Decoding is `decode_rows` (rows at one position, or
each at its own), eager or compiled (`Runner`'s doc says how per device); `decode_step` is the
static whole-cache form CUDA graphs replay.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch

from llama.model import CacheSpan, Transformer


@dataclass
class Prefill:
    """A prompt run into cache row `row` (after its soft prompt, if any)."""

    row: int
    ids: list[int]
    prefix: Optional[torch.Tensor] = None
    all_logits: bool = False
    """Return every position's logits (echo with logprobs: the prompt is scored)."""


@dataclass
class Step:
    """One step's work, the same on every rank.

    Decoding covers cache rows 0..len(tokens)-1: row r feeds tokens[r] at positions[r]. Rows that are
    not generating this step (free, or admitted in this very step) get a dummy token at a position
    whose cache entry is rewritten before it is ever attended to.
    """

    prefills: list[Prefill] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    stop: bool = False
    """Leave the loop: the server is shutting down."""


class Runner:
    """Runs steps on this rank's shard: prefill a row, decode rows.

    Decoding runs `decode_rows` (rows in step at one int position attend over the filled positions;
    rows at their own positions over the longest), eagerly or, with `compile`, compiled:
    - on CUDA, as gpt-fast: one static-shape step (`decode_step`: all rows, the whole cache,
      positions as data) replayed as a CUDA graph, which removes the per-kernel launch cost;
    - on CPU there is no graph to replay, and attending over the whole cache costs more than the
      compiled small ops save (bench/RESULTS.md), so `decode_rows` itself is compiled with dynamic
      shapes: one graph for every position and row count (batch 1 and the two position forms get
      their own), which fuses the norms, RoPE, SwiGLU and cache writes between the linears.
    """

    def __init__(self, model: Transformer, device: torch.device, compile: bool = False):
        self.model, self.device = model, device
        self.compiled = None
        self.static = compile and device.type == "cuda"
        if self.static:
            self.compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        elif compile:
            self.compiled = torch.compile(decode_rows, fullgraph=True, dynamic=True)

    @property
    def fixed_rows(self) -> bool:
        """A static compiled step (CUDA) keeps one shape: every step decodes all cache rows."""
        return self.static

    @torch.inference_mode()
    def run(self, step: Step) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """Logits of each prefill ([V], or [T, V] with all_logits) and of the decoded rows ([rows, V])."""
        prefill_logits = [self.prefill(p) for p in step.prefills]
        return prefill_logits, self.decode(step.tokens, step.positions) if step.tokens else None

    def prefill(self, p: Prefill) -> torch.Tensor:
        model = self.model
        tokens = torch.tensor([p.ids], device=self.device)
        prefix = None if p.prefix is None else p.prefix.to(self.device).unsqueeze(0)
        hidden = model.hidden_states(tokens, CacheSpan(slice(p.row, p.row + 1), 0), prefix=prefix)[0]  # [T, dim]
        return model.output(hidden if p.all_logits else hidden[-1]).float()

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.static:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            return self.compiled(self.model, ids, pos)
        step = self.compiled or decode_rows
        if len(set(positions)) == 1:  # rows in step: the plain causal path over the filled positions
            return step(self.model, ids, positions[0], None)
        return step(self.model, ids, pos, max(positions) + 1)


def decode_rows(model: Transformer, tokens: torch.Tensor, start: int | torch.Tensor, length: Optional[int]) -> torch.Tensor:
    """Logits [rows, V] of one token per cache row: every row at position `start` (an int; attending
    over the filled positions), or each at its own (`start` a [rows] tensor; attending over the first
    `length` positions, a row's later ones masked)."""
    span = CacheSpan(slice(0, tokens.size(0)), start, length)
    return model.output(model.hidden_states(tokens, span)[:, -1]).float()


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits [rows, V] of one token per cache row at its position, attending over the whole cache
    (later positions masked): the same shapes every step, what torch.compile turns into one graph."""
    span = CacheSpan(slice(0, tokens.size(0)), positions)
    return model.output(model.hidden_states(tokens, span)[:, -1]).float()
