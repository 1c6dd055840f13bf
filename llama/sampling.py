"""How the next token is chosen: the settings (`Sampling`, one set of defaults for the library, the
CLIs and the server), the choice itself (`sample`, `choose`) and the log-probabilities reported
with it (`TokenLogprob`, `prompt_logprobs`)."""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from llama.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """Generation settings of one request or one run.

    The defaults are greedy decoding, so a run is reproducible unless asked otherwise; the
    OpenAI-compatible server uses them too when a request leaves a field out (as vLLM uses a
    model's own defaults).
    """

    temperature: float = 0.0
    """0: greedy (argmax); above 0: softmax(logits / temperature), then nucleus sampling."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1)."""
    seed: Optional[int] = None
    """Sampling seed of this request; None: drawn from the engine's generator (seeded alike on every rank)."""
    max_tokens: int = 64
    """Tokens to generate at most (fewer if the sequence reaches max_seq_len); 0 with `echo`: the
    prompt is only scored."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion; the text stops before the first one."""
    top_logprobs: Optional[int] = None
    """None: no logprobs; k >= 0: each token's logprob and the k most likely alternatives."""
    echo: bool = False
    """With top_logprobs, also score the prompt (each prompt token's logprob, from the prefill's logits)."""

    def __post_init__(self):
        check(self.temperature, self.top_p)
        if self.max_tokens < 0 or (self.max_tokens == 0 and not self.echo):
            raise UserError(f"max_tokens must be at least 1 (0 only to score the prompt, with echo), got {self.max_tokens}")


def check(temperature: float, top_p: float) -> None:
    """A temperature below 0 or a nucleus outside (0, 1] is an error, not a silent greedy run."""
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be 0 (greedy) or above, got {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}: 1 keeps every token, 0.9 the most likely 90%")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability given the tokens before it, and the `top` likeliest alternatives."""

    id: int
    logprob: Optional[float]
    """None for a prompt's first token: nothing precedes it."""
    top: list[tuple[int, float]]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Next token [B] from last-position logits [B, V]: argmax at temperature 0, else top-p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def choose(logits: torch.Tensor, settings: Sampling, generator: torch.Generator) -> tuple[int, Optional[TokenLogprob]]:
    """One row's next token from its logits [V], with its logprob and alternatives when asked for."""
    token = int(sample(logits.unsqueeze(0), settings.temperature, settings.top_p, generator)[0])
    if settings.top_logprobs is None:
        return token, None
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(settings.top_logprobs) if settings.top_logprobs > 0 else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return token, TokenLogprob(token, float(logprobs[token]), alternatives)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top_k: int = 0) -> list[TokenLogprob]:
    """Each prompt token's logprob given the tokens before it (None for the first), with its top_k
    alternatives, from the logits [T, V] of one forward over the prompt: what `Llama.score` and the
    server's echo return."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(ids[1:], device=logits.device).unsqueeze(-1)).squeeze(-1).tolist()
    if top_k > 0:
        top = logprobs.topk(top_k)
        alternatives = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [TokenLogprob(ids[0], None, [])] + [TokenLogprob(i, lp, alts) for i, lp, alts in zip(ids[1:], chosen, alternatives)]
