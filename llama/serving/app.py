"""An OpenAI-compatible HTTP app in front of N tensor-parallel ranks (rank 0's; llama/serving/process.py
runs it and the other ranks).

Rank 0 runs FastAPI under uvicorn on its main thread and the engine's step loop (llama/engine.py,
`Engine.serve_steps`: rank 0 schedules each step and broadcasts it) on an engine thread; every other
rank runs the same step loop on its main thread and holds no socket. HTTP handlers validate a
request (llama/serving/requests.py), hand it to the engine's scheduler and wait on an asyncio queue
that the engine thread fills with pieces of text.
"""

import asyncio
import hmac
import json
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama import chat
from llama.engine import Piece, QueueFull, RequestError, Scheduler, ShuttingDown, check_ids
from llama.engine import Request as Job
from llama.generation import Llama
from llama.sampling import Sampling
from llama.serving.openai_api import ChatRequest, CompletionRequest, DetokenizeRequest, GenerationFields, Reply, TokenizeRequest, error_body
from llama.serving.requests import APIError, Prompt, chat_prompt, check_length, completion_prompts, sampling_for
from llama.tokenizer import special_tokens


MAX_REQUEST_BYTES = 16 * 2**20
"""The default --max_request_size: ids of 64 prompts of 8192 tokens, or 4 million characters of text."""


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 in OpenAI's error shape, and is read
    no further (by its Content-Length, or as its chunks arrive)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.reject(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await self.reject(scope, receive, send)

    async def reject(self, scope, receive, send) -> None:
        message = f"the request body is over this server's --max_request_size of {self.max_bytes} bytes: send less per request"
        await JSONResponse(error_body(message, code="request_too_large"), status_code=413)(scope, receive, send)


class Server:
    """Rank 0's HTTP side: the FastAPI app over a scheduler. Tokenizing and detokenizing run on a
    worker thread, so a large request does not hold the event loop (other requests keep streaming)."""

    def __init__(self, llm: Llama, scheduler: Scheduler, model_name: str, api_key: Optional[str], max_request_bytes: int = MAX_REQUEST_BYTES):
        self.llm, self.scheduler, self.model_name, self.api_key = llm, scheduler, model_name, api_key
        self.max_request_bytes = max_request_bytes
        llm.tokenizer.max_token_chars  # computed once now, not in the first request
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="llama-mp", docs_url=None, redoc_url=None)
        app.add_middleware(BodyLimit, max_bytes=self.max_request_bytes)
        app.add_exception_handler(APIError, lambda _, err: JSONResponse(err.body, status_code=err.status))
        app.add_exception_handler(RequestValidationError, self._invalid)
        app.add_exception_handler(StarletteHTTPException, lambda _, err: JSONResponse(error_body(str(err.detail)), status_code=err.status_code))
        auth = [Depends(self._check_key)]
        app.get("/health")(self.health)
        app.get("/v1/models", dependencies=auth)(self.models)
        app.post("/v1/completions", dependencies=auth)(self.completions)
        app.post("/v1/chat/completions", dependencies=auth)(self.chat_completions)
        app.get("/tokenizer_info", dependencies=auth)(self.tokenizer_info)
        app.post("/tokenize", dependencies=auth)(self.tokenize)
        app.post("/detokenize", dependencies=auth)(self.detokenize)
        return app

    @staticmethod
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 becomes OpenAI's 400 naming the bad field (a union's alternatives joined)."""
        errors = err.errors()
        if errors[0].get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}"), status_code=400)
        locs = [[str(part) for part in e.get("loc", ()) if part != "body"] for e in errors]
        common = next((i for i, parts in enumerate(zip(*locs)) if len(set(parts)) > 1), min(map(len, locs)))
        param = ".".join(locs[0][:common]) or None
        reasons = " or ".join(dict.fromkeys(e.get("msg", "") for e in errors))
        return JSONResponse(error_body(f"{param or 'body'}: {reasons}", param=param), status_code=400)

    async def _check_key(self, authorization: Optional[str] = Header(None)) -> None:
        if self.api_key is None:
            return
        if authorization is None or not hmac.compare_digest(authorization.encode(), f"Bearer {self.api_key}".encode()):
            message = "missing or incorrect API key: send 'Authorization: Bearer <key>' with the server's --api_key"
            raise APIError(401, message, code="invalid_api_key")

    async def health(self) -> dict:
        """Liveness plus the scheduler's counters (decode_steps vs decoded_tokens shows shared steps)."""
        return {"status": "ok", "model": self.model_name, "tp": self.llm.parallel.tp_size, **self.scheduler.snapshot()}

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "llama-mp"}]}

    async def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: the special tokens' text and the family's chat template (Jinja)."""
        tok, names = self.llm.tokenizer, {i: text for text, i in special_tokens(self.llm.tokenizer).items()}
        return {"tokenizer_class": type(tok).__name__, "bos_token": names.get(tok.bos_id), "eos_token": names.get(tok.eos_id),
                "pad_token": names.get(tok.pad_id), "add_bos_token": True, "model_max_length": self.llm.model.max_seq_len,
                "chat_template": chat.CHAT_TEMPLATES.get(tok.family)}

    async def tokenize(self, body: TokenizeRequest) -> dict:
        return await run_in_threadpool(self._tokenize, body)

    def _tokenize(self, body: TokenizeRequest) -> dict:
        """vLLM's /tokenize: a prompt's ids as /v1/completions encodes it (BOS unless add_special_tokens
        is false), or a chat's as /v1/chat/completions does. Special-token text stays text, except a
        prompt that is exactly one special token: lm-eval finds the BOS/EOS ids that way."""
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt (a string) or messages (a chat), not both or neither", "prompt")
        if body.messages is not None:
            ids = chat_prompt(self.llm, body)
        elif body.prompt in (specials := special_tokens(self.llm.tokenizer)):
            ids = [specials[body.prompt]]
        else:
            check_length(self.llm, body.prompt)
            ids = self.llm.tokenizer.encode(body.prompt, bos=body.add_special_tokens, eos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.llm.model.max_seq_len}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        try:
            check_ids(body.tokens, self.llm.model.args.vocab_size, "tokens", "tokens")
        except RequestError as err:
            raise APIError.of(err) from None
        return {"prompt": await run_in_threadpool(self.llm.tokenizer.decode, body.tokens)}

    async def completions(self, body: CompletionRequest, request: Request):
        prompts = await run_in_threadpool(completion_prompts, self.llm, body.prompt)
        if body.stream and (body.echo or len(prompts) > 1):
            raise APIError(400, "echo and lists of prompts are not streamed: send them with stream false", "stream")
        if len(prompts) > self.scheduler.max_queue:
            message = f"{len(prompts)} prompts exceed this server's --max_queue {self.scheduler.max_queue}: send at most that many per request"
            raise APIError(400, message, "prompt")
        samplings = [sampling_for(body, body.max_tokens, body.logprobs, body.echo) for _ in prompts]
        if body.stream:
            return await self._respond(request, body, prompts[0].ids, samplings[0], chat=False)
        return await self._complete_all(request, body, prompts, samplings)

    async def _complete_all(self, request: Request, body: CompletionRequest, prompts: list[Prompt], samplings: list[Sampling]) -> dict:
        """Queue every prompt at once (they share the scheduler's steps); one choice each, in order."""
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in prompts]
        jobs = [Job(p.ids, sampling, on_piece=self._deliverer(loop, queue)) for p, sampling, queue in zip(prompts, samplings, queues)]
        self._submit(jobs)
        reply = Reply(False, model=self.model_name, tokenizer=self.llm.tokenizer, prompt_ids=[], token_ids=body.return_token_ids)
        try:
            results = await asyncio.gather(*(self._pieces(request, job, queue) for job, queue in zip(jobs, queues)))
        finally:
            for job in jobs:
                self.scheduler.cancel(job)  # a no-op once finished; frees the rows if this task was cancelled
        if any(r is None for r in results):
            return {}  # the client hung up
        choices = await run_in_threadpool(lambda: [self._choice(reply, body, p, job, *r) for p, job, r in zip(prompts, jobs, results)])
        return reply.completions(choices)

    def _choice(self, reply: Reply, body: CompletionRequest, prompt: Prompt, job: Job, text: str, ids: list[int], logprobs: list, finish: str):
        """(text, prompt ids, ids, logprobs, finish) of one choice; with echo the prompt comes first."""
        lp = None
        if body.echo:
            text = (prompt.text if prompt.text is not None else self.llm.tokenizer.decode(prompt.ids)) + text
            if job.sampling.top_logprobs is not None:
                lp = reply.logprobs(job.prompt_logprobs[prompt.hidden :] + logprobs, 0, prompt.ids[: prompt.hidden])
        elif job.sampling.top_logprobs is not None:
            lp = reply.logprobs(logprobs, 0, prompt.ids)
        return text, prompt.ids, ids, lp, finish

    async def chat_completions(self, body: ChatRequest, request: Request):
        prompt = await run_in_threadpool(chat_prompt, self.llm, body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        sampling = sampling_for(body, max_tokens, top)
        return await self._respond(request, body, prompt, sampling, chat=True)

    @staticmethod
    def _deliverer(loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue):
        def deliver(piece: Piece) -> None:  # engine thread -> event loop
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, piece)
            except RuntimeError:
                pass  # the event loop is closed: the server has stopped

        return deliver

    def _submit(self, jobs: list[Job]) -> None:
        try:
            self.scheduler.add(jobs)
        except QueueFull:
            message = "the server is busy (every batch row and the queue are full): retry later"
            raise APIError(503, message, type_="server_error", code="overloaded") from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type_="server_error") from None
        except RequestError as err:
            raise APIError.of(err) from None

    async def _respond(self, request: Request, body: GenerationFields, prompt: list[int], sampling: Sampling, chat: bool):
        """Queue the job, then stream its pieces as server-sent events or wait for all of them."""
        pieces = asyncio.Queue()
        job = Job(prompt, sampling, on_piece=self._deliverer(asyncio.get_running_loop(), pieces))
        self._submit([job])
        reply = Reply(chat, model=self.model_name, tokenizer=self.llm.tokenizer, prompt_ids=prompt, token_ids=body.return_token_ids)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._events(job, pieces, reply, usage), media_type="text/event-stream")
        try:
            result = await self._pieces(request, job, pieces)
        finally:
            self.scheduler.cancel(job)  # a no-op once finished; frees the row if this task was cancelled
        if result is None:
            return {}
        text, ids, logprobs, finish = result
        lp = await run_in_threadpool(reply.logprobs, logprobs, 0, prompt) if job.sampling.top_logprobs is not None else None
        return reply.full(text, ids, lp, finish)

    async def _pieces(self, request: Request, job: Job, pieces: asyncio.Queue) -> Optional[tuple[str, list[int], list, str]]:
        """(text, ids, logprobs, finish reason) of a non-streamed job; None if the client hung up
        (checked every second), which cancels the job."""
        text, ids, logprobs = [], [], []
        while True:
            try:
                piece = await asyncio.wait_for(pieces.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    return None
                continue
            text.append(piece.text)
            ids += piece.ids
            logprobs += piece.logprobs
            if piece.finish_reason == "cancelled":
                raise APIError(503, "the server is shutting down", type_="server_error")
            if piece.finish_reason is not None:
                return "".join(text), ids, logprobs, piece.finish_reason

    async def _events(self, job: Job, pieces: asyncio.Queue, reply: Reply, usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

        A client that disconnects makes Starlette cancel this generator: `finally` frees the row.
        """
        try:
            first, offset, seen = True, 0, list(job.prompt)
            if reply.chat:
                yield sse(reply.chunk(None, None, first=True))
                first = False
            while True:
                piece = await pieces.get()
                if piece.finish_reason == "cancelled":  # shutting down: an error event ends the stream
                    yield sse(error_body("the server is shutting down: the completion was cut short", "server_error"))
                    return
                lp = reply.logprobs(piece.logprobs, offset, seen) if job.sampling.top_logprobs is not None else None
                yield sse(reply.chunk(piece, lp, first))
                first, offset, seen = False, offset + len(piece.text), seen + piece.ids
                if piece.finish_reason is not None:
                    break
            if usage:
                yield sse(reply.usage_chunk(len(job.ids)))
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(job)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
