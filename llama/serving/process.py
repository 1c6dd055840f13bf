"""The server process: serve.py's options, rank 0's socket and HTTP server, the other ranks' step loop.

Rank 0 binds its socket before serving (a taken port is one clear error on every rank), runs the app
(llama/serving/app.py) under uvicorn on its main thread and the engine's step loop on an engine thread;
the other ranks follow rank 0's steps on their main thread.

Shutdown (SIGTERM or Ctrl-C on rank 0, or SIGTERM to every rank as torchrun sends it): the
server stops accepting, open requests get --shutdown_timeout seconds to finish, the ones still
running are cancelled (a stream ends with an error event, a plain request gets a 503), the
scheduler broadcasts a stop plan, every rank leaves its loop, meets at a barrier and exits 0.
The other ranks ignore the signal itself: they stop when rank 0 tells them to.
"""

import asyncio
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import uvicorn

from llama import distributed
from llama.config import LoadSpec
from llama.engine import Engine, Scheduler
from llama.errors import UserError
from llama.formats import adapters
from llama.generation import Llama, check_compile
from llama.serving.app import MAX_REQUEST_BYTES, Server


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


@dataclass(frozen=True)
class ServeOptions:
    """serve.py's options, parsed and checked before anything is loaded or bound."""

    spec: LoadSpec
    compile: bool = False
    adapter: Optional[Path] = None
    """A LoRA adapter (adapter.pt or a PEFT LoRA directory) every request runs with."""
    max_queue: int = 64
    """Requests that may wait for a row; beyond them a 503."""
    seed: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    model_name: Optional[str] = None
    shutdown_timeout: float = 5.0
    log_level: str = "warning"
    max_request_bytes: int = MAX_REQUEST_BYTES


def serve_http(llm: Llama, engine: Engine, sock: socket.socket, options: ServeOptions) -> None:
    """Rank 0: the engine thread runs the step loop, uvicorn runs on this (main) thread."""
    scheduler = engine.scheduler
    model_name = options.model_name or options.spec.ckpt_dir.name
    app = Server(llm, scheduler, model_name, options.api_key, options.max_request_bytes).app
    # the jobs are cancelled after --shutdown_timeout; uvicorn's own timeout only backs that up
    config = uvicorn.Config(app, log_level=options.log_level, timeout_graceful_shutdown=2.0, lifespan="off")
    server = GracefulServer(config, scheduler, options.shutdown_timeout)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if llm.parallel.device.type == "cuda":
                torch.cuda.set_device(llm.parallel.device)  # the current device is per host thread
            engine.serve_steps(leader=True)
        except BaseException as err:  # a rank died or a bug: stop serving, say why once
            failure.append(err)
            server.should_exit = True

    thread = threading.Thread(target=run, name="engine", daemon=True)
    thread.start()
    # uvicorn catches SIGTERM/SIGINT while it runs, then re-raises them with the previous handler:
    # make that handler a no-op so the process goes on to stop the other ranks.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    host, port = sock.getsockname()[:2]
    ranks = llm.parallel.tp_size
    print(f"serving {model_name} on http://{host}:{port} with {ranks} tensor-parallel rank{'s' * (ranks > 1)}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        thread.join()
    if failure:
        print(f"error: the step loop stopped: {failure[0]!r}", file=sys.stderr, flush=True)
        sys.exit(1)


def follow(engine: Engine) -> None:
    """Ranks > 0: run rank 0's steps until it says stop; a signal alone does not stop them."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    engine.serve_steps(leader=False)


def main(options: ServeOptions) -> None:
    check_compile(options.spec.quantize, options.compile)
    if options.adapter is not None and adapters.adapter_kind(options.adapter) != "lora":
        raise UserError(f"--adapter {options.adapter} is not a LoRA adapter: serve.py runs LoRA adapters (a soft prompt runs with example_ft.py)")
    llm = Llama.build(options.spec, seed=options.seed)
    try:
        if options.adapter is not None:
            adapters.apply_adapter(llm.model, options.adapter)
        # requests without a seed get a random one; compiled here, once (the facade's engine is not used)
        engine = Engine(llm.model, llm.tokenizer, llm.parallel.device, seed=None, compile=options.compile, max_queue=options.max_queue)
        sock, error = bind(options.host, options.port) if llm.parallel.is_main else (None, None)
        error = distributed.broadcast_object(error, llm.parallel.device)
        if error is not None:
            raise UserError(error)
        if llm.parallel.is_main:
            serve_http(llm, engine, sock, options)
        else:
            follow(engine)
        dist.barrier()
        if llm.parallel.is_main:
            print(f"stopped: all {llm.parallel.world_size} ranks left the step loop", flush=True)
    finally:
        distributed.teardown()
