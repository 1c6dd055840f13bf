"""Rank 0's side of continuous batching: which request holds which KV-cache row, and what it gets.

Requests wait in a bounded queue (`QueueFull` beyond it, a 503 for the client) until a row is
free; the lowest free row is taken, so the rows a step decodes stay packed at the top of the
cache. After each step the scheduler samples every row's next token, checks stop tokens, stop
strings and length, and hands each request the new text through its `deliver` callback (called
on the engine thread; the HTTP side forwards it to its event loop). A finished or cancelled
request frees its row for the next step.
"""

import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llama.generation import Llama, prompt_logprobs
from llama.sampling import Sampling, sample
from llama.serving.batching import Plan


class QueueFull(Exception):
    """Every row is busy and the queue holds --max_queue requests."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass
class TokenLogprob:
    id: int
    logprob: Optional[float]
    """None for a prompt's first token: nothing precedes it."""
    top: list[tuple[int, float]]


@dataclass
class Piece:
    """What a request receives after a step: its new text and the tokens that made it."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: Optional[str] = None
    """On the last piece: "stop" (stop token or string), "length", or "cancelled" (shutdown)."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    deliver: Callable[[Piece], None]
    ids: list[int] = field(default_factory=list)
    row: Optional[int] = None
    cancelled: bool = False
    shown: int = 0
    """Characters of the completion text already delivered."""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: Optional[torch.Generator] = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """With echo: one entry per prompt token, set before the first piece is delivered."""


def stop_string_end(text: str, stops: tuple[str, ...], start: int) -> Optional[int]:
    """Where the completion ends if a stop string occurs in text[start:], else None."""
    hits = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(hits) if hits else None


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown now: not an unfinished character (U+FFFD at the end, a
    byte-fallback token waiting for the rest of its bytes) nor a tail that may start a stop string."""
    if text.endswith("\ufffd"):
        return len(text.rstrip("\ufffd"))
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return len(text) - held


class Scheduler:
    """Rows, queue and sampling on rank 0; `next_plan`/`consume` are called by the step loop."""

    def __init__(self, llm: Llama, max_queue: int, heartbeat_s: float = 5.0):
        self.llm = llm
        self.rows: list[Optional[Request]] = [None] * llm.model.cache_rows
        self.waiting: deque[Request] = deque()
        self.max_queue = max_queue
        self.heartbeat_s = heartbeat_s
        self.fixed_rows = llm.compiled_step is not None  # a compiled step keeps one shape: all rows
        self.cond = threading.Condition()
        self.stopping = False
        self.refusing = False
        self.decoding: list[int] = []
        self.stats = {"decode_steps": 0, "decoded_tokens": 0, "max_rows_decoded": 0, "prefills": 0, "completed": 0, "cancelled": 0}

    # -- called from the HTTP side (any thread) --

    def submit(self, request: Request) -> None:
        self.submit_all([request])

    def submit_all(self, requests: list[Request]) -> None:
        """Queue all of `requests` (one HTTP request's prompts) or none of them."""
        with self.cond:
            if self.refusing:
                raise ShuttingDown()
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull()
            for request in requests:
                seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
                request.generator = torch.Generator(self.llm.parallel.device).manual_seed(seed)
                self.waiting.append(request)
            self.cond.notify()

    def cancel(self, request: Request) -> None:
        """The client went away: its row is freed at the next step."""
        with self.cond:
            request.cancelled = True
            self.cond.notify()

    def refuse(self) -> None:
        """Take no new requests (ShuttingDown); those already in keep going."""
        with self.cond:
            self.refusing = True

    def idle(self) -> bool:
        with self.cond:
            return not self.waiting and not any(self.rows)

    def stop(self) -> None:
        """Cancel every request and end the step loop at its next plan."""
        with self.cond:
            self.refusing = self.stopping = True
            self.cond.notify()

    def snapshot(self) -> dict:
        with self.cond:
            active = sum(r is not None for r in self.rows)
            return {**self.stats, "active": active, "queued": len(self.waiting), "rows": len(self.rows)}

    # -- called by the step loop (engine thread) --

    def next_plan(self) -> Plan:
        """Free cancelled rows, admit waiting requests into free rows, list the rows to decode.

        With nothing to do it waits up to heartbeat_s, then sends an empty plan anyway: the
        other ranks sit in the broadcast, and a collective that waits too long times out.
        """
        with self.cond:
            if not self.stopping and not self.waiting and not any(self.rows):
                self.cond.wait(self.heartbeat_s)
            self._drop_cancelled()
            if self.stopping:
                self._cancel_all()
                return Plan(stop=True)
            admit = self._admit()
            plan = self._plan(admit)
            plan.score_rows = [row for row, _ in admit if self.rows[row].sampling.echo and self.rows[row].sampling.top_logprobs is not None]
            return plan

    def consume(self, plan: Plan, prefill_logits: list[torch.Tensor], decode_logits: Optional[torch.Tensor]) -> None:
        """Sample each admitted and each decoded row's next token and deliver the results."""
        for (row, _), logits in zip(plan.admit, prefill_logits):
            if row in plan.score_rows:
                self._score_prompt(self.rows[row], logits)
                logits = logits[-1]
            self._accept(self.rows[row], logits)
        self.stats["prefills"] += len(plan.admit)
        if decode_logits is None:
            return
        for row in self.decoding:
            self._accept(self.rows[row], decode_logits[row])
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += len(self.decoding)
        self.stats["max_rows_decoded"] = max(self.stats["max_rows_decoded"], len(self.decoding))

    def _drop_cancelled(self) -> None:
        kept = deque(r for r in self.waiting if not r.cancelled)
        self.stats["cancelled"] += len(self.waiting) - len(kept)
        self.waiting = kept
        for row, request in enumerate(self.rows):
            if request is not None and request.cancelled:
                self.rows[row] = None
                self.stats["cancelled"] += 1

    def _cancel_all(self) -> None:
        for request in [*self.waiting, *(r for r in self.rows if r is not None)]:
            request.deliver(Piece("", [], [], "cancelled"))
        self.waiting.clear()
        self.rows = [None] * len(self.rows)

    def _admit(self) -> list[tuple[int, list[int]]]:
        admit = []
        for row in range(len(self.rows)):
            if self.rows[row] is None and self.waiting:
                request = self.waiting.popleft()
                request.row, self.rows[row] = row, request
                admit.append((row, request.prompt))
        return admit

    def _plan(self, admit: list[tuple[int, list[int]]]) -> Plan:
        """Decode rows: those that have sampled a token not yet fed back (not the ones just admitted)."""
        admitted = {row for row, _ in admit}
        self.decoding = [row for row, r in enumerate(self.rows) if r is not None and r.ids and row not in admitted]
        if not self.decoding:
            return Plan(admit=admit)
        n_rows = len(self.rows) if self.fixed_rows else self.decoding[-1] + 1
        tokens, positions = [0] * n_rows, [0] * n_rows
        for row in range(n_rows):
            request = self.rows[row]
            if request is None:
                continue  # free: position 0 is rewritten by the next prefill into this row
            if row in admitted:
                positions[row] = len(request.prompt)  # its first decode rewrites this position
            else:
                tokens[row], positions[row] = request.ids[-1], len(request.prompt) + len(request.ids) - 1
        return Plan(admit=admit, tokens=tokens, positions=positions)

    def _score_prompt(self, request: Request, logits: torch.Tensor) -> None:
        """Echo: each prompt token's logprob (and top alternatives) from the prefill's logits [T, V]."""
        chosen, top = prompt_logprobs(logits, torch.tensor(request.prompt, device=logits.device), request.sampling.top_logprobs or 0)
        alternatives = [list(zip(i, v)) for i, v in zip(top[1].tolist(), top[0].tolist())] if top is not None else [[]] * len(chosen)
        request.prompt_logprobs = [TokenLogprob(request.prompt[0], None, [])] + [
            TokenLogprob(i, lp, alts) for i, lp, alts in zip(request.prompt[1:], chosen.tolist(), alternatives)]

    def _sample(self, request: Request, logits: torch.Tensor) -> tuple[int, Optional[TokenLogprob]]:
        settings = request.sampling
        token = int(sample(logits.unsqueeze(0), settings.temperature, settings.top_p, request.generator)[0])  # argmax at 0
        if settings.top_logprobs is None:
            return token, None
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = logprobs.topk(settings.top_logprobs) if settings.top_logprobs > 0 else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return token, TokenLogprob(token, float(logprobs[token]), alternatives)

    def _accept(self, request: Request, logits: torch.Tensor) -> None:
        """One new token for `request`: stop token, stop string, length, or more text to show."""
        if request.cancelled:
            return
        if request.sampling.max_new == 0:  # echo only: the prompt was scored, nothing to generate
            self._finish(request, Piece("", [], [], "length"))
            return
        token, logprob = self._sample(request, logits)
        stops = request.sampling.stop
        finish = "stop" if token in self.llm.tokenizer.stop_ids else None
        if logprob is not None:  # a stop token keeps its entry (lm-eval drops the last one)
            request.pending_logprobs.append(logprob)
        if finish is None:
            request.ids.append(token)
            request.pending_ids.append(token)
        text = self.llm.decode_continuation(request.prompt, request.ids)
        end = len(text)
        stop_at = stop_string_end(text, stops, max(0, request.shown - max(map(len, stops), default=0)))
        if stop_at is not None:
            end, finish = stop_at, "stop"
        elif finish is None and len(request.ids) >= request.sampling.max_new:
            finish = "length"
        elif finish is None:
            end = safe_end(text, stops)
        piece = Piece(text[request.shown : end], request.pending_ids, request.pending_logprobs, finish)
        if finish is not None:
            self._finish(request, piece)
        elif end > request.shown:
            request.deliver(piece)
            request.shown, request.pending_ids, request.pending_logprobs = end, [], []

    def _finish(self, request: Request, piece: Piece) -> None:
        """Deliver the last piece and free the row."""
        request.deliver(piece)
        self.rows[request.row] = None
        self.stats["completed"] += 1
