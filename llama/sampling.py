"""How the next token is chosen: the settings (`Sampling`, one set of defaults for the library, the
CLIs and the server) and the choice itself (`sample`)."""

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
    """Sampling seed; None: the generator's current state (the server draws one per request)."""
    max_new: int = 64
    """Tokens to generate at most (the server caps it so that prompt + max_new <= max_seq_len); 0
    with `echo`: the prompt is only scored."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion; the text stops before the first one."""
    top_logprobs: Optional[int] = None
    """None: no logprobs; k >= 0: each token's logprob and the k most likely alternatives."""
    echo: bool = False
    """Server: echo the prompt; with top_logprobs, score it too (from the prefill's logits)."""

    def __post_init__(self):
        check(self.temperature, self.top_p)


def check(temperature: float, top_p: float) -> None:
    """A temperature below 0 or a nucleus outside (0, 1] is an error, not a silent greedy run."""
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be 0 (greedy) or above, got {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}: 1 keeps every token, 0.9 the most likely 90%")


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
