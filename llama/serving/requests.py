"""From an OpenAI request body to what the model runs: prompt ids, sampling settings, or a 4xx.

Every check that can refuse a request lives here, before anything reaches the scheduler, and
answers with OpenAI's error body (`APIError`) naming the field.
"""

from dataclasses import dataclass
from typing import Optional

from llama.engine import RequestError, check_ids
from llama.errors import UserError
from llama.generation import Llama
from llama.sampling import Sampling
from llama.serving.openai_api import ChatRequest, GenerationFields, error_body


class APIError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, *, code: Optional[str] = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)

    @staticmethod
    def of(err: RequestError) -> "APIError":
        """The engine's refusal of a prompt as a 400."""
        return APIError(400, str(err), err.param, code=err.code)


def sampling_for(body: GenerationFields, max_tokens: Optional[int], top_logprobs: Optional[int], echo: bool = False) -> Sampling:
    """The request's settings, or a 400 naming the field. A missing max_tokens runs to the end of
    the context (the engine stops every request there); the prompt's length is the engine's check."""
    if body.n != 1:
        raise APIError(400, "only n=1 is supported: send one request per completion", "n")
    if max_tokens is not None and max_tokens < (0 if echo else 1):
        fix = "" if echo else " (0 only with echo: score the prompt)"
        raise APIError(400, f"max_tokens must be at least {0 if echo else 1}, got {max_tokens}{fix}", "max_tokens")
    limit = max_tokens if max_tokens is not None else 2**31 - 1
    return Sampling(body.temperature, body.top_p, body.seed, limit, body.stop_strings(), top_logprobs, echo)


@dataclass
class Prompt:
    """One prompt of a completion request as the model sees it."""

    ids: list[int]
    text: Optional[str]
    """The string as sent (None: sent as token ids)."""
    hidden: int
    """Leading ids the server added (the BOS before a string): never echoed, as lm-eval counts
    a context's tokens without it."""


def completion_prompts(llm: Llama, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """The request's prompts: a string or ids is one; a list of either is several (a 400 if empty)."""
    single = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
    prompts = [prompt] if single else prompt
    if not prompts:
        raise APIError(400, "prompt is an empty list: send a string, token ids, or a non-empty list of either", "prompt")
    return [completion_prompt(llm, p) for p in prompts]


def check_length(llm: Llama, text: str, param: str = "prompt") -> None:
    """A string that could not fit the context is refused before it is tokenized: tokenizing tens of
    megabytes would hold the server for seconds only to find it too long."""
    longest = llm.model.max_seq_len * llm.tokenizer.max_token_chars
    if len(text) > longest:
        raise APIError(400, f"{param} has {len(text)} characters: more than --max_seq_len {llm.model.max_seq_len} tokens can hold "
                            f"(at most {llm.tokenizer.max_token_chars} characters each); shorten it", param, code="context_length_exceeded")


def completion_prompt(llm: Llama, prompt: str | list[int]) -> Prompt:
    if isinstance(prompt, str):
        check_length(llm, prompt)
        return Prompt(llm.tokenizer.encode(prompt, bos=True, eos=False), prompt, 1)
    try:
        check_ids(prompt, llm.model.args.vocab_size, "the prompt")
    except RequestError as err:
        raise APIError.of(err) from None
    return Prompt(prompt, None, 0)


def chat_prompt(llm: Llama, body: ChatRequest) -> list[int]:
    check_length(llm, "".join(m.text() for m in body.messages), "messages")
    try:
        return llm.chat_tokens([{"role": m.role, "content": m.text()} for m in body.messages])
    except UserError as err:
        raise APIError(400, str(err), "messages") from None
