"""The OpenAI wire format: request bodies (validated strictly), response and stream-chunk bodies.

Only the fields this server honours are declared; unknown fields are ignored, as OpenAI-style
servers commonly do, but a declared field of the wrong type is a 400. `return_token_ids`
(vLLM's extension) adds `prompt_token_ids` and `token_ids` to each choice. The tokenizer
endpoints (`/tokenize`, `/detokenize`, `/tokenizer_info`) take vLLM's shapes, which
lm-evaluation-harness's remote tokenizer speaks.
"""

import time
import uuid
from itertools import accumulate
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from llama.engine import Piece
from llama.sampling import Sampling, TokenLogprob
from llama.tokenizer import WINDOW, Tokenizer, token_texts

MAX_TOP_LOGPROBS = 5
"""OpenAI's limit for legacy completions; enough for a margin check (top-2)."""


class Strict(BaseModel):
    """No coercion ("5" is not 5), no NaN or infinity for a number, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class GenerationFields(Strict):
    """Fields shared by both endpoints."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = Field(Sampling.temperature, ge=0.0, le=2.0)  # left out: the project's default (greedy)
    top_p: float = Field(Sampling.top_p, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    return_token_ids: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(GenerationFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    """A string, token ids, or a list of either: one choice per prompt, `index` its position."""
    max_tokens: Optional[int] = 16  # OpenAI's default for /v1/completions
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class TokenizeRequest(Strict):
    """vLLM's /tokenize: a prompt (BOS added unless add_special_tokens is false) or a chat."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True


class DetokenizeRequest(Strict):
    model: Optional[str] = None
    tokens: list[int]


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error object, which its client turns into BadRequestError, AuthenticationError, ..."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def entry(text: str, logprob: float) -> dict:
    """A chat logprob entry: the token's text in context and its UTF-8 bytes."""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """One response's id, timestamps and body builders for either endpoint."""

    def __init__(self, chat: bool, *, model: str, tokenizer: Tokenizer, prompt_ids: list[int], token_ids: bool):
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.prompt_ids, self.token_ids = prompt_ids, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, object_: str, choice: dict) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": [choice]}

    def logprobs(self, logprobs: list[TokenLogprob], offset: int, context: list[int]) -> dict:
        """Per-token logprobs in the chat ({"content": [...]}) or legacy completion layout. Each token's
        text is read after `context` (the ids before it), so leading spaces are kept and the tokens
        join to the choice's text; `text_offset` (counted from `offset`) indexes it. An echoed
        prompt's first token has null logprobs: nothing precedes it."""
        ids = context + [lp.id for lp in logprobs]
        tokens = token_texts(self.tokenizer, ids, len(context))
        contexts = [ids[max(0, i - WINDOW) : i] for i in range(len(context), len(ids))]
        alternatives = [None if lp.logprob is None else {i: (self._text_after(before, i), v) for i, v in lp.top}
                        for lp, before in zip(logprobs, contexts)]
        if self.chat:
            return {"content": [{**entry(text, lp.logprob), "top_logprobs": [entry(t, v) for t, v in (alts or {}).values()]}
                                for text, lp, alts in zip(tokens, logprobs, alternatives)]}
        offsets = list(accumulate((len(t) for t in tokens[:-1]), initial=offset))[: len(tokens)]
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [None if alts is None else {t: v for t, v in alts.values()} for alts in alternatives],
            "text_offset": offsets,
        }

    def _text_after(self, context: list[int], token: int) -> str:
        return token_texts(self.tokenizer, context + [token], len(context))[0]

    def _choice(self, text: str, ids: list[int], logprobs: Optional[dict], finish: Optional[str], delta: bool, first: bool = True,
                index: int = 0, prompt_ids: Optional[list[int]] = None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
            choice = {"index": index, ("delta" if delta else "message"): message, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if self.token_ids:
            choice["token_ids"] = ids
            if first:
                choice["prompt_token_ids"] = self.prompt_ids if prompt_ids is None else prompt_ids
        return choice

    def completions(self, choices: list[tuple[str, list[int], list[int], Optional[dict], str]]) -> dict:
        """A /v1/completions body of several choices: (text, prompt ids, ids, logprobs, finish) each."""
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        body["choices"] = [self._choice(text, ids, lp, finish, delta=False, index=i, prompt_ids=prompt)
                           for i, (text, prompt, ids, lp, finish) in enumerate(choices)]
        body["usage"] = usage(sum(len(c[1]) for c in choices), sum(len(c[2]) for c in choices))
        return body

    def full(self, text: str, ids: list[int], logprobs: Optional[dict], finish: str) -> dict:
        object_ = "chat.completion" if self.chat else "text_completion"
        body = self._envelope(object_, self._choice(text, ids, logprobs, finish, delta=False))
        return {**body, "usage": usage(len(self.prompt_ids), len(ids))}

    def chunk(self, piece: Optional[Piece], logprobs: Optional[dict], first: bool) -> dict:
        """A stream chunk with a piece's text (None: the chat stream's opening role chunk); the
        first chunk carries the prompt's ids when token ids are asked for."""
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        if piece is None:
            choice = self._choice("", [], None, None, delta=True, first=first)
            choice["delta"] = {"role": "assistant", "content": ""}
            return self._envelope(object_, choice)
        finish = None if piece.finish_reason == "cancelled" else piece.finish_reason
        return self._envelope(object_, self._choice(piece.text, piece.ids, logprobs, finish, delta=True, first=first))

    def usage_chunk(self, completion_tokens: int) -> dict:
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": [],
                "usage": usage(len(self.prompt_ids), completion_tokens)}
