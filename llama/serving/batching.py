"""Continuous batching on every rank: one loop of steps, each step's work decided by rank 0.

A step admits new prompts (each prefilled alone into a free row of the KV cache) and decodes
one token for every row in generation, each row at its own position, so requests that arrive
at different times share decoding steps. Rank 0's scheduler (llama/serving/scheduler.py) writes each
step as a `Plan` and broadcasts it with torch.distributed (gloo or nccl); every rank runs it on
its shard of the model. Only rank 0 samples, so the other ranks need nothing but the plan:
the tokens a step decodes are the ones rank 0 sampled at the step before.
"""

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from llama.generation import Llama, prefill
from llama.model import Transformer


@dataclass
class Plan:
    """One step's work, the same on every rank.

    `tokens`/`positions` cover cache rows 0..len-1: row r decodes tokens[r] at positions[r].
    Rows that are not generating this step (free, or admitted in this very step) get a dummy
    token at a position whose cache entry is rewritten before it is ever attended to.
    """

    admit: list[tuple[int, list[int]]] = field(default_factory=list)
    """(cache row, prompt ids) to prefill before decoding."""
    score_rows: list[int] = field(default_factory=list)
    """Admitted rows whose prefill returns every position's logits (echo: the prompt is scored)."""
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    stop: bool = False
    """Leave the loop: the server is shutting down."""


class Planner(Protocol):
    """What rank 0's loop needs from the scheduler."""

    def next_plan(self) -> Plan: ...

    def consume(self, plan: Plan, prefill_logits: list[torch.Tensor], decode_logits: Optional[torch.Tensor]) -> None: ...


def broadcast(obj: object, device: torch.device) -> object:
    """Rank 0's `obj` on every rank (the others pass None): a plan is a pickle of a few hundred bytes."""
    if dist.get_world_size() == 1:
        return obj  # one process: nothing to send (a tiny model's step is ~1 ms, pickling is not free)
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def prefill_row(model: Transformer, row: int, prompt: list[int], device: torch.device, all_logits: bool = False) -> torch.Tensor:
    """Last-position logits [V] (all_logits: every position's, [T, V]) of `prompt` run from
    position 0 into cache row `row` only.

    The other rows keep their keys/values: each layer attends through a one-row view of its
    cache (`KVCache.rows`) for this forward pass. Same shapes as a single-prompt `prefill`.
    """
    attentions = [layer.attention for layer in model.layers]
    caches = [attn.cache for attn in attentions]
    for attn, cache in zip(attentions, caches):
        attn.cache = cache.rows(row, row + 1)
    try:
        logits = prefill(model, torch.tensor([prompt], device=device), None, all_logits)[0]
        return logits if all_logits else logits[-1]
    finally:
        for attn, cache in zip(attentions, caches):
            attn.cache = cache


def decode_rows(llm: Llama, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """Logits [rows, V] of one token per cache row, row r at positions[r] (the static-shape step)."""
    device = llm.parallel.device
    token_ids = torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1)
    return llm.decode(token_ids, torch.tensor(positions, dtype=torch.long, device=device))[:, -1]


@torch.inference_mode()
def run_plan(llm: Llama, plan: Plan) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """Execute one step on this rank's shard: prefill logits per admitted prompt ([V], or [T, V]
    for a score row), decode logits."""
    device = llm.parallel.device
    prefill_logits = [prefill_row(llm.model, row, prompt, device, row in plan.score_rows) for row, prompt in plan.admit]
    decode_logits = decode_rows(llm, plan.tokens, plan.positions) if plan.tokens else None
    return prefill_logits, decode_logits


def run_steps(llm: Llama, planner: Optional[Planner]) -> None:
    """The loop every rank runs until a stop plan: rank 0 passes its scheduler, the others None."""
    device = llm.parallel.device
    while True:
        plan = broadcast(planner.next_plan() if planner is not None else None, device)
        if plan.stop:
            return
        prefill_logits, decode_logits = run_plan(llm, plan)
        if planner is not None:
            planner.consume(plan, prefill_logits, decode_logits)

