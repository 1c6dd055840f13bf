"""One generation engine: requests in, text and tokens out, over the rows of the KV cache.

The shape is nano-vllm's. `Engine.add` queues a `Request`; `Engine.step` runs one step:

1. `Scheduler.schedule` writes the step as a `Step`: waiting requests take free cache rows (each
   prompt prefilled alone into its row), and every row already generating decodes one token at its
   own position (continuous batching: requests that came at different times share the step);
2. `Runner.run` (llama/runner.py) executes the step on this rank's shard of the model; every
   tensor-parallel rank runs the same step, and the forward's collectives pair them up;
3. `Scheduler.finish_step` samples each row's next token, checks stop tokens, stop strings and
   length, and hands the request its new text (`Piece`s: an unfinished UTF-8 character, or a tail
   that may start a stop string, is held back until it is settled). A finished request frees its row.

`Engine.generate` adds requests and steps until they are done: `Llama.generate`, `stream` and
`score` (llama/generation.py) are its clients. Under torchrun every rank makes the same library
calls, so every rank schedules the same steps (sampling draws from generators seeded alike). The HTTP
server (llama/serving/) is the other client: only its rank 0 hears requests, so rank 0 schedules and
broadcasts each `Step` (`serve_steps`), and the other ranks run what they receive.
"""

import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llama import distributed
from llama.errors import UserError
from llama.model import Transformer
from llama.runner import Prefill, Runner, Step
from llama.sampling import Sampling, TokenLogprob, choose, prompt_logprobs
from llama.tokenizer import Tokenizer, continuation_text, shown_part


class QueueFull(Exception):
    """Every row is busy and the queue holds `max_queue` requests."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


class RequestError(UserError):
    """A request the model cannot run (empty, ids outside the vocabulary, too long); `param` and
    `code` name the field for an HTTP answer."""

    def __init__(self, message: str, param: str = "prompt", code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Piece:
    """What a request receives after a step: its new text and the tokens that made it."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: Optional[str] = None
    """On the last piece: "stop" (a stop token or string), "length", or "cancelled" (shutdown)."""


@dataclass
class Completion:
    """A finished request: the generated ids (a stop token excluded) and their text."""

    prompt: list[int]
    ids: list[int]
    text: str
    finish_reason: str
    logprobs: Optional[list[TokenLogprob]] = None
    """With `top_logprobs`: one per generated token, and one for a generated stop token."""
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    """With `echo` and `top_logprobs`: one per prompt token (the first has logprob None)."""


@dataclass(eq=False)
class Request:
    """One prompt to complete, and where it stands."""

    prompt: list[int]
    sampling: Sampling = Sampling()
    prefix: Optional[torch.Tensor] = None
    """A soft prompt [P, dim] before the prompt, at positions 0..P-1 (llama/tuning/prompt.py)."""
    on_piece: Optional[Callable[[Piece], None]] = None
    """Called with each new piece of text (on the thread that runs the steps)."""
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    text: str = ""
    """The completion's text delivered so far."""
    finish_reason: Optional[str] = None
    row: Optional[int] = None
    generator: Optional[torch.Generator] = None
    cancelled: bool = False
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def n_prefix(self) -> int:
        return 0 if self.prefix is None else self.prefix.size(0)

    @property
    def scores_prompt(self) -> bool:
        return self.sampling.echo and self.sampling.top_logprobs is not None

    def completion(self) -> Completion:
        logprobs = self.logprobs if self.sampling.top_logprobs is not None else None
        return Completion(self.prompt, self.ids, self.text, self.finish_reason or "", logprobs, self.prompt_logprobs)


def check_ids(ids: list[int], vocab_size: int, what: str = "prompt", param: str = "prompt") -> None:
    """The one vocabulary check: `ids` are token ids of this model, in [0, vocab_size)."""
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise RequestError(f"{what} has token ids outside the vocabulary [0, {vocab_size})", param)


def check_request(request: Request, vocab_size: int, max_seq_len: int, what: str = "the prompt") -> None:
    """The one check of a prompt against the model: 1.. ids of its vocabulary that leave room for a
    token (or fit, when the prompt is only scored); a RequestError says what is wrong."""
    prompt, room = request.prompt, max_seq_len - request.n_prefix
    if not prompt:
        raise RequestError(f"{what} is empty: give at least one token (the BOS token counts)")
    check_ids(prompt, vocab_size, what)
    scoring_only = request.sampling.max_tokens == 0
    if len(prompt) > room or (len(prompt) == room and not scoring_only):
        longest = room if scoring_only else room - 1
        raise RequestError(f"{what} has {len(prompt)} tokens but --max_seq_len is {room}: shorten it to at most {longest} "
                           "tokens or raise --max_seq_len", code="context_length_exceeded")


def stop_string_end(text: str, stops: tuple[str, ...], start: int) -> Optional[int]:
    """Where the completion ends if a stop string occurs in text[start:], else None."""
    hits = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(hits) if hits else None


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown now: not an unfinished character (a byte-fallback token
    waiting for the rest of its bytes) nor a tail that may start a stop string."""
    if shown_part(text) != text:
        return len(shown_part(text))
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return len(text) - held


class Scheduler:
    """Rows, queue and sampling: which request holds which cache row, and what it gets.

    Requests wait (beyond `max_queue` of them, `add` raises QueueFull) until a row is free; the
    lowest free row is taken, so the rows a step decodes stay packed at the top of the cache. Thread
    safe: a server's HTTP side adds and cancels while the engine thread schedules and finishes steps.
    """

    def __init__(self, tokenizer: Tokenizer, *, rows: int, max_seq_len: int, vocab_size: int, device: torch.device,
                 fixed_rows: bool = False, max_queue: Optional[int] = None, seeds: Optional[Callable[[], int]] = None):
        self.tokenizer, self.max_seq_len, self.vocab_size, self.device = tokenizer, max_seq_len, vocab_size, device
        self.rows: list[Optional[Request]] = [None] * rows
        self.waiting: deque[Request] = deque()
        self.fixed_rows, self.max_queue = fixed_rows, max_queue
        self.seeds = seeds or (lambda: random.getrandbits(63))
        self.cond = threading.Condition()
        self.stopping = self.refusing = False
        self.decoding: list[int] = []
        self.stats = {"decode_steps": 0, "decoded_tokens": 0, "max_rows_decoded": 0, "prefills": 0, "completed": 0, "cancelled": 0}

    # -- adding and removing requests (any thread) --

    def add(self, requests: list[Request]) -> None:
        """Queue all of `requests` or none of them (QueueFull, ShuttingDown, RequestError)."""
        for i, request in enumerate(requests):
            check_request(request, self.vocab_size, self.max_seq_len, f"prompt {i}" if len(requests) > 1 else "the prompt")
        with self.cond:
            if self.refusing:
                raise ShuttingDown()
            if self.max_queue is not None and len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull()
            for request in requests:
                seed = request.sampling.seed if request.sampling.seed is not None else self.seeds()
                request.generator = torch.Generator(self.device).manual_seed(seed)
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

    def stop(self) -> None:
        """Cancel every request and end the step loop at its next schedule."""
        with self.cond:
            self.refusing = self.stopping = True
            self.cond.notify()

    def idle(self) -> bool:
        with self.cond:
            return not self.waiting and not any(self.rows)

    def snapshot(self) -> dict:
        with self.cond:
            active = sum(r is not None for r in self.rows)
            return {**self.stats, "active": active, "queued": len(self.waiting), "rows": len(self.rows)}

    # -- the step loop's side --

    def schedule(self, wait_s: float = 0.0) -> Step:
        """Free cancelled rows, admit waiting requests into free rows, list the rows to decode.

        With nothing to do it waits up to wait_s (a server's heartbeat: the other ranks sit in the
        broadcast, and a collective that waits too long times out), then returns an empty step.
        """
        with self.cond:
            if wait_s and not self.stopping and not self.waiting and not any(self.rows):
                self.cond.wait(wait_s)
            self._drop_cancelled()
            if self.stopping:
                self._cancel_all()
                return Step(stop=True)
            admitted = self._admit()
            step = self._decode_rows(admitted)
            step.prefills = [Prefill(row, r.prompt, r.prefix, r.scores_prompt) for row, r in admitted.items()]
            return step

    def finish_step(self, step: Step, prefill_logits: list[torch.Tensor], decode_logits: Optional[torch.Tensor]) -> None:
        """Sample each admitted and each decoded row's next token and deliver the results."""
        for prefill, logits in zip(step.prefills, prefill_logits):
            request = self.rows[prefill.row]
            if request is None:
                continue
            if prefill.all_logits:
                request.prompt_logprobs = prompt_logprobs(logits, request.prompt, request.sampling.top_logprobs or 0)
                logits = logits[-1]
            self._accept(request, logits)
        self.stats["prefills"] += len(step.prefills)
        if decode_logits is None:
            return
        for row in self.decoding:
            if self.rows[row] is not None:
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
            request.finish_reason = "cancelled"
            if request.on_piece is not None:
                request.on_piece(Piece("", [], [], "cancelled"))
        self.waiting.clear()
        self.rows = [None] * len(self.rows)

    def _admit(self) -> dict[int, Request]:
        admitted = {}
        for row in range(len(self.rows)):
            if self.rows[row] is None and self.waiting:
                request = self.waiting.popleft()
                request.row, self.rows[row] = row, request
                admitted[row] = request
        return admitted

    def _decode_rows(self, admitted: dict[int, Request]) -> Step:
        """Decode rows: those that have sampled a token not yet fed back (not the ones just admitted)."""
        self.decoding = [row for row, r in enumerate(self.rows) if r is not None and r.ids and row not in admitted]
        if not self.decoding:
            return Step()
        n_rows = len(self.rows) if self.fixed_rows else self.decoding[-1] + 1
        tokens, positions = [0] * n_rows, [0] * n_rows
        for row in range(n_rows):
            request = self.rows[row]
            if request is None:
                continue  # free: position 0 is rewritten by the next prefill into this row
            end = request.n_prefix + len(request.prompt)
            if row in admitted:
                positions[row] = end  # its first decode rewrites this position
            else:
                tokens[row], positions[row] = request.ids[-1], end + len(request.ids) - 1
        return Step(tokens=tokens, positions=positions)

    def _accept(self, request: Request, logits: torch.Tensor) -> None:
        """One new token for `request`: a stop token, a stop string, the length, or more text to show."""
        if request.cancelled:
            return
        settings = request.sampling
        if settings.max_tokens == 0:  # the prompt was scored, nothing to generate
            self._finish(request, Piece("", [], [], "length"))
            return
        token, logprob = choose(logits, settings, request.generator)
        finish = "stop" if token in self.tokenizer.stop_ids else None
        if logprob is not None:  # a stop token keeps its entry (lm-eval drops the last one)
            request.pending_logprobs.append(logprob)
        if finish is None:
            request.ids.append(token)
            request.pending_ids.append(token)
        text = continuation_text(self.tokenizer, request.prompt, request.ids)
        shown, end = len(request.text), len(text)
        stop_at = stop_string_end(text, settings.stop, max(0, shown - max(map(len, settings.stop), default=0)))
        room = self.max_seq_len - request.n_prefix - len(request.prompt)
        if stop_at is not None:
            end, finish = stop_at, "stop"
        elif finish is None and len(request.ids) >= min(settings.max_tokens, room):
            finish = "length"
        elif finish is None:
            end = safe_end(text, settings.stop)
        piece = Piece(text[shown:end], request.pending_ids, request.pending_logprobs, finish)
        if finish is not None:
            self._finish(request, piece)
        elif end > shown:
            self._deliver(request, piece)

    def _deliver(self, request: Request, piece: Piece) -> None:
        request.text += piece.text
        request.logprobs += piece.logprobs
        request.pending_ids, request.pending_logprobs = [], []
        if request.on_piece is not None:
            request.on_piece(piece)

    def _finish(self, request: Request, piece: Piece) -> None:
        """Deliver the last piece and free the row."""
        request.finish_reason = piece.finish_reason
        self._deliver(request, piece)
        self.rows[request.row] = None
        self.stats["completed"] += 1


class Engine:
    """The model on this rank, its runner and its scheduler: add requests, step until done."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, device: torch.device, *, seed: Optional[int] = 1, compile: bool = False,
                 max_queue: Optional[int] = None):
        """`seed`: requests without a seed draw theirs from a generator seeded so (the same on every rank,
        as library calls need); None: from Python's random (a server's requests). `max_queue`: the most
        requests that may wait for a row (None: any number)."""
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.runner = Runner(model, device, compile)
        seeds = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            seeds = lambda: int(torch.randint(2**62, (1,), generator=generator))  # noqa: E731
        self.scheduler = Scheduler(tokenizer, rows=model.cache_rows, max_seq_len=model.max_seq_len, vocab_size=model.args.vocab_size, device=device,
                                   fixed_rows=self.runner.fixed_rows, max_queue=max_queue, seeds=seeds)

    def add(self, requests: list[Request]) -> None:
        self.scheduler.add(requests)

    def step(self) -> None:
        step = self.scheduler.schedule()
        self.scheduler.finish_step(step, *self.runner.run(step))

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Run `requests` (more than the cache has rows wait for a free one) until every one is done."""
        self.add(requests)
        while any(r.finish_reason is None for r in requests):
            self.step()
        return [r.completion() for r in requests]

    def serve_steps(self, leader: bool, heartbeat_s: float = 5.0) -> None:
        """A server's loop on every rank until a stop step: rank 0 (`leader`) schedules and broadcasts
        each step; the other ranks run what they receive."""
        while True:
            step = distributed.broadcast_object(self.scheduler.schedule(heartbeat_s) if leader else None, self.device)
            if step.stop:
                return
            logits = self.runner.run(step)
            if leader:
                self.scheduler.finish_step(step, *logits)
