"""An OpenAI-compatible HTTP server in front of N tensor-parallel ranks.

Rank 0 runs FastAPI under uvicorn on its main thread and the step loop (llama/batching.py)
on an engine thread; every other rank runs the same step loop on its main thread and holds
no socket. HTTP handlers validate a request, hand it to the scheduler (llama/scheduler.py)
and wait on an asyncio queue that the engine thread fills with pieces of text.

Shutdown (SIGTERM or Ctrl-C on rank 0, or SIGTERM to every rank as torchrun sends it): the
server stops accepting, open requests get --shutdown_timeout seconds to finish, the ones still
running are cancelled (a stream ends with an error event, a plain request gets a 503), the
scheduler broadcasts a stop plan, every rank leaves its loop, meets at a barrier and exits 0.
The other ranks ignore the signal itself: they stop when rank 0 tells them to.
"""

import argparse
import asyncio
import hmac
import json
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import AsyncIterator, Optional

import torch
import torch.distributed as dist
import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama import distributed, lora
from llama.batching import broadcast, run_steps
from llama.errors import UserError
from llama.generation import Llama
from llama.openai_api import ChatRequest, CompletionRequest, GenerationFields, Reply, error_body
from llama.scheduler import Piece, QueueFull, Sampling, Scheduler, ShuttingDown
from llama.scheduler import Request as Job


class APIError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def sampling_for(body: GenerationFields, max_tokens: Optional[int], n_prompt: int, max_seq_len: int, top_logprobs: Optional[int]) -> Sampling:
    """The request's settings, or a 400 naming the field: the prompt must leave room for one token."""
    if body.n != 1:
        raise APIError(400, "only n=1 is supported: send one request per completion", "n")
    room = max_seq_len - n_prompt
    if room < 1:
        message = f"the prompt has {n_prompt} tokens but this server's --max_seq_len is {max_seq_len}: shorten it to at most {max_seq_len - 1}"
        raise APIError(400, message, "prompt", "context_length_exceeded")
    if max_tokens is not None and max_tokens <= 0:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    max_new = room if max_tokens is None else min(max_tokens, room)
    return Sampling(max_new, body.temperature, body.top_p, body.seed, body.stop_strings(), top_logprobs)


def completion_prompt(llm: Llama, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return llm.tokenizer.encode(prompt, bos=True, eos=False)
    if not prompt or not all(0 <= i < llm.model.args.vocab_size for i in prompt):
        raise APIError(400, f"prompt token ids must be a non-empty list of ids in [0, {llm.model.args.vocab_size})", "prompt")
    return prompt


def chat_prompt(llm: Llama, body: ChatRequest) -> list[int]:
    try:
        return llm.chat_tokens([{"role": m.role, "content": m.text()} for m in body.messages])
    except UserError as err:
        raise APIError(400, str(err), "messages") from None


class Server:
    """Rank 0's HTTP side: the FastAPI app over a scheduler."""

    def __init__(self, llm: Llama, scheduler: Scheduler, model_name: str, api_key: Optional[str]):
        self.llm, self.scheduler, self.model_name, self.api_key = llm, scheduler, model_name, api_key
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="llama-mp", docs_url=None, redoc_url=None)
        app.add_exception_handler(APIError, lambda _, err: JSONResponse(err.body, status_code=err.status))
        app.add_exception_handler(RequestValidationError, self._invalid)
        app.add_exception_handler(StarletteHTTPException, lambda _, err: JSONResponse(error_body(str(err.detail)), status_code=err.status_code))
        auth = [Depends(self._check_key)]
        app.get("/health")(self.health)
        app.get("/v1/models", dependencies=auth)(self.models)
        app.post("/v1/completions", dependencies=auth)(self.completions)
        app.post("/v1/chat/completions", dependencies=auth)(self.chat_completions)
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

    async def completions(self, body: CompletionRequest, request: Request):
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        prompt = completion_prompt(self.llm, body.prompt)
        sampling = sampling_for(body, body.max_tokens, len(prompt), self.llm.model.max_seq_len, body.logprobs)
        return await self._respond(request, body, prompt, sampling, chat=False)

    async def chat_completions(self, body: ChatRequest, request: Request):
        prompt = chat_prompt(self.llm, body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        sampling = sampling_for(body, max_tokens, len(prompt), self.llm.model.max_seq_len, top)
        return await self._respond(request, body, prompt, sampling, chat=True)

    async def _respond(self, request: Request, body: GenerationFields, prompt: list[int], sampling: Sampling, chat: bool):
        """Queue the job, then stream its pieces as server-sent events or wait for all of them."""
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(piece: Piece) -> None:  # engine thread -> event loop
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, piece)
            except RuntimeError:
                pass  # the event loop is closed: the server has stopped

        job = Job(prompt, sampling, deliver)
        try:
            self.scheduler.submit(job)
        except QueueFull:
            message = "the server is busy (every batch row and the queue are full): retry later"
            raise APIError(503, message, type_="server_error", code="overloaded") from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type_="server_error") from None
        reply = Reply(chat, self.model_name, lambda i: self.llm.tokenizer.decode([i]), prompt, body.return_token_ids)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._events(job, pieces, reply, usage), media_type="text/event-stream")
        return await self._collect(request, job, pieces, reply)

    async def _collect(self, request: Request, job: Job, pieces: asyncio.Queue, reply: Reply) -> dict:
        """All pieces of a non-streamed job; a client that hung up cancels it (checked every second)."""
        text, ids, logprobs = [], [], []
        try:
            while True:
                try:
                    piece = await asyncio.wait_for(pieces.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.scheduler.cancel(job)
                        return {}
                    continue
                text.append(piece.text)
                ids += piece.ids
                logprobs += piece.logprobs
                if piece.finish_reason == "cancelled":
                    raise APIError(503, "the server is shutting down", type_="server_error")
                if piece.finish_reason is not None:
                    break
        finally:
            self.scheduler.cancel(job)  # a no-op once finished; frees the row if this task was cancelled
        lp = reply.logprobs(logprobs, 0) if job.sampling.top_logprobs is not None else None
        return reply.full("".join(text), ids, lp, piece.finish_reason)

    async def _events(self, job: Job, pieces: asyncio.Queue, reply: Reply, usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

        A client that disconnects makes Starlette cancel this generator: `finally` frees the row.
        """
        try:
            first, offset = True, 0
            if reply.chat:
                yield sse(reply.chunk(None, None, first=True))
                first = False
            while True:
                piece = await pieces.get()
                if piece.finish_reason == "cancelled":  # shutting down: an error event ends the stream
                    yield sse(error_body("the server is shutting down: the completion was cut short", "server_error"))
                    return
                lp = reply.logprobs(piece.logprobs, offset) if job.sampling.top_logprobs is not None else None
                yield sse(reply.chunk(piece, lp, first))
                first, offset = False, offset + len(piece.text)
                if piece.finish_reason is not None:
                    break
            if usage:
                yield sse(reply.usage_chunk(len(job.ids)))
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(job)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def bind(host: str, port: int) -> tuple[Optional[socket.socket], Optional[str]]:
    """Rank 0's listening socket, bound before serving so that a taken port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # With proto IPPROTO_TCP (not 0) asyncio sets TCP_NODELAY on each connection; without it
    # Nagle's algorithm holds small writes (a stream's chunks) for the client's delayed ACK, ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        return None, f"cannot listen on {host}:{port} ({err.strerror}): pass a free --port or another --host"
    return sock, None


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose shutdown first lets open requests finish, then cancels the rest.

    Cancelled jobs end their streams with an error event (and non-streamed ones with a 503), so
    every client gets a complete response instead of a connection cut mid-body.
    """

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace_s: float):
        super().__init__(config)
        self.scheduler, self.grace_s = scheduler, grace_s

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        for server in self.servers:  # stop accepting
            server.close()
        self.scheduler.refuse()
        deadline = asyncio.get_running_loop().time() + self.grace_s
        while not self.scheduler.idle() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.scheduler.stop()
        await super().shutdown(sockets)


def serve_http(llm: Llama, sock: socket.socket, args: argparse.Namespace) -> None:
    """Rank 0: the engine thread runs the step loop, uvicorn runs on this (main) thread."""
    scheduler = Scheduler(llm, args.max_queue)
    model_name = args.model_name or Path(args.ckpt_dir).name
    app = Server(llm, scheduler, model_name, args.api_key).app
    # the jobs are cancelled after --shutdown_timeout; uvicorn's own timeout only backs that up
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=2.0, lifespan="off")
    server = GracefulServer(config, scheduler, args.shutdown_timeout)
    failure: list[BaseException] = []

    def engine() -> None:
        try:
            if llm.parallel.device.type == "cuda":
                torch.cuda.set_device(llm.parallel.device)  # the current device is per host thread
            run_steps(llm, scheduler)
        except BaseException as err:  # a rank died or a bug: stop serving, say why once
            failure.append(err)
            server.should_exit = True

    thread = threading.Thread(target=engine, name="engine", daemon=True)
    thread.start()
    # uvicorn catches SIGTERM/SIGINT while it runs, then re-raises them with the previous handler:
    # make that handler a no-op so the process goes on to stop the other ranks.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    host, port = sock.getsockname()[:2]
    print(f"serving {model_name} on http://{host}:{port} with {llm.parallel.tp_size} tensor-parallel ranks", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        thread.join()
    if failure:
        print(f"error: the step loop stopped: {failure[0]!r}", file=sys.stderr, flush=True)
        sys.exit(1)


def follow(llm: Llama) -> None:
    """Ranks > 0: run rank 0's plans until it says stop; a signal alone does not stop them."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    run_steps(llm, None)


def main(args: argparse.Namespace) -> None:
    if args.max_queue < 0 or args.max_batch_size < 1:
        raise UserError("--max_queue must be >= 0 and --max_batch_size >= 1")
    rope = {"factor": args.rope_scaling_factor} if args.rope_scaling_factor is not None else None
    if args.adapter is not None and lora.adapter_kind(args.adapter) != "lora":
        raise UserError(f"--adapter {args.adapter} is not a LoRA adapter: serve.py runs LoRA adapters (a soft prompt runs with example_ft.py)")
    llm = Llama.build(args.ckpt_dir, args.tokenizer_path, args.max_seq_len, args.max_batch_size, args.dtype, args.seed,
                      compile=args.compile, rope_scaling=rope, quantize=getattr(args, "quantize", None))
    try:
        if args.adapter is not None:
            lora.apply_adapter(llm.model, args.adapter)
        sock, error = bind(args.host, args.port) if llm.parallel.is_main else (None, None)
        error = broadcast(error, llm.parallel.device)
        if error is not None:
            raise UserError(error)
        if llm.parallel.is_main:
            serve_http(llm, sock, args)
        else:
            follow(llm)
        dist.barrier()
        if llm.parallel.is_main:
            print(f"stopped: all {llm.parallel.world_size} ranks left the step loop", flush=True)
    finally:
        distributed.teardown()
