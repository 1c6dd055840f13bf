"""Serving throughput: requests/s, tokens/s and time to first token at 1, 4 and 8 concurrent clients.

Each shape is measured twice in the same run: first example.py's path in this process (greedy
`Llama.generate` on C prompts at once, no server: C = 1 is the single-request baseline, larger C
a static batch, the most batching gives on this machine), then through `serve.py` (a
subprocess, or `torchrun` with --nproc > 1) with C client threads each sending --requests
streamed greedy completions back to back. tokens/s is all completion tokens / wall time
(prefill included) in both; TTFT is the time to a request's first streamed text.

    python bench/serve.py                                  # stories260K and a random 110M-shaped model
    python bench/serve.py --shapes 110M --clients 1 4 --gen_len 32 --threads 2
    python bench/serve.py --nproc 2                        # the server on 2 tensor-parallel ranks

The 110M shape gets random weights saved to a temporary checkpoint (Llama 2 tokenizer, prompts
of random token ids) that is deleted afterwards. Prints one JSON line per configuration and a
Markdown table. Targets (issue 13): 4 clients >= 2.5x the aggregate tokens/s of 1; 1 client
through the server >= 0.9x example.py.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.common import device_name, emit_json, format_table  # noqa: E402
from llama import distributed  # noqa: E402
from llama.errors import UserError, run_cli  # noqa: E402
from llama.formats import layout  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from llama.sampling import Sampling  # noqa: E402

STORIES = REPO / "ckpts" / "stories260K"
LLAMA2_TOKENIZER = REPO / "tests" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
SHAPES: dict[str, Optional[dict]] = {"stories260K": None, "110M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000)}
STORY_PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The cat", "One day, a little boy named Tim",
                 "There was a big tree", "Sam had a red ball", "The sun was hot", "Mia liked to sing"]

TABLE = [
    ("shape", "shape", ""), ("mode", "mode", ""), ("clients", "clients", ""), ("requests", "requests", ""),
    ("req_s", "req/s", ".2f"), ("tok_s", "tok/s", ".1f"), ("vs_one_client", "x 1 client", ".2f"),
    ("vs_example", "x example.py 1 prompt", ".2f"), ("vs_static", "x static batch", ".2f"),
    ("ttft_ms", "TTFT ms (median)", ".1f"), ("per_request_tok_s", "tok/s per request", ".1f"),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8], help="concurrent clients per phase")
    parser.add_argument("--requests", type=int, default=3, help="requests each client sends, one after another")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each phase; the fastest is reported (other jobs only slow runs down)")
    parser.add_argument("--gen_len", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--prompt_len", type=int, default=16, help="prompt tokens of the random-weight shapes")
    parser.add_argument("--nproc", type=int, default=1, help="tensor-parallel ranks of the server")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per process (default: cores / nproc)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1 or args.repeats < 1 or args.gen_len < 2 or args.nproc < 1:
        raise UserError("--clients, --requests, --nproc must be >= 1 and --gen_len >= 2")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    return args


def random_checkpoint(shape: str, directory: Path) -> Path:
    """A one-shard Meta checkpoint with random weights (values do not matter to speed)."""
    args = ModelArgs(**SHAPES[shape])
    torch.save(layout.random_state_dict(args), directory / "consolidated.00.pth")
    params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "norm_eps")}
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copy(LLAMA2_TOKENIZER, directory / "tokenizer.model")
    return directory


def prompts_for(shape: str, count: int, prompt_len: int) -> list:
    """Story openings for stories260K; random ids (no special ids) for random weights."""
    if SHAPES[shape] is None:
        return [STORY_PROMPTS[i % len(STORY_PROMPTS)] for i in range(count)]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, SHAPES[shape]["vocab_size"], (count, prompt_len), generator=gen).tolist()


def example_rates(ckpt_dir: Path, prompts: list, cli: argparse.Namespace, max_seq_len: int) -> dict[int, dict]:
    """example.py's path without a server: `Llama.generate` on B prompts at once (greedy), for B
    in --clients. B = 1 is the single-request baseline; larger B is a static batch, the most
    batching can give on this machine, against which the server's concurrent clients compare."""
    torch.set_num_threads(cli.threads)
    llm = Llama.build(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max(cli.clients), tp_size=1)
    encode = lambda p: llm.tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else p  # noqa: E731
    try:
        llm.generate([encode(prompts[0])], Sampling(max_tokens=4))  # warm-up
        rates = {}
        for batch in cli.clients:
            best = 0.0
            for r in range(cli.repeats):
                ids = [encode(prompts[(r * batch + i) % len(prompts)]) for i in range(batch)]
                start = time.perf_counter()
                out = [c.ids for c in llm.generate(ids, Sampling(max_tokens=cli.gen_len))]
                best = max(best, sum(map(len, out)) / (time.perf_counter() - start))
            rates[batch] = best
        return rates
    finally:
        del llm
        distributed.teardown()


def start_server(ckpt_dir: Path, port: int, cli: argparse.Namespace, max_seq_len: int) -> subprocess.Popen:
    launcher = [sys.executable] if cli.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cli.nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]
    cmd = [*launcher, str(REPO / "serve.py"), "--ckpt_dir", str(ckpt_dir), "--port", str(port),
           "--max_batch_size", str(max(cli.clients)), "--max_seq_len", str(max_seq_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(cli.threads), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"serve.py exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise UserError("serve.py did not answer /health within 300 s")


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_request(http: httpx.Client, url: str, prompt, gen_len: int) -> tuple[float, float, int]:
    """(time to first text, latency, completion tokens) of one streamed greedy completion."""
    body = {"prompt": prompt, "max_tokens": gen_len, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with http.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise UserError(f"server answered {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def run_phase(url: str, prompts: list, clients: int, cli: argparse.Namespace) -> dict:
    """C clients, each sending --requests completions back to back, all starting together."""
    results: list[tuple[float, float, int]] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients + 1)

    def client(index: int) -> None:
        with httpx.Client() as http:
            barrier.wait()
            for r in range(cli.requests):
                result = one_request(http, url, prompts[(index * cli.requests + r) % len(prompts)], cli.gen_len)
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(n for _, _, n in results)
    return {
        "clients": clients, "requests": len(results), "req_s": len(results) / wall, "tok_s": tokens / wall,
        "ttft_ms": 1000 * median(t for t, _, _ in results), "per_request_tok_s": median(n / lat for _, lat, n in results),
    }


def bench_shape(shape: str, cli: argparse.Namespace, workdir: Path) -> list[dict]:
    ckpt_dir = STORIES if SHAPES[shape] is None else random_checkpoint(shape, Path(tempfile.mkdtemp(dir=workdir)))
    prompts = prompts_for(shape, 64, cli.prompt_len)
    max_seq_len = 2 * (cli.prompt_len + 16) + cli.gen_len  # the story prompts are < 16 tokens
    base = {"bench": "serve", "device": device_name(torch.device("cpu")), "torch": torch.__version__, "shape": shape,
            "threads": cli.threads, "tp": cli.nproc, "gen_len": cli.gen_len}
    example = example_rates(ckpt_dir, prompts, cli, max_seq_len)
    records = []
    for batch, tok_s in example.items():
        records.append({**base, "mode": "example.py (static batch)", "clients": batch, "tok_s": tok_s,
                        "vs_one_client": tok_s / example[min(example)], "vs_example": tok_s / example[1] if 1 in example else None})
        emit_json(records[-1], cli.out)
    port = free_port()
    server = start_server(ckpt_dir, port, cli, max_seq_len)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client() as http:
            one_request(http, url, prompts[0], 4)  # warm-up
        one_client = None
        for clients in cli.clients:
            record = max((run_phase(url, prompts, clients, cli) for _ in range(cli.repeats)), key=lambda r: r["tok_s"])
            record = {**base, "mode": "server", **record}
            one_client = one_client or (record["tok_s"] if clients == 1 else None)
            record["vs_one_client"] = record["tok_s"] / one_client if one_client else None
            record["vs_example"] = record["tok_s"] / example[1] if 1 in example else None
            record["vs_static"] = record["tok_s"] / example[clients]
            records.append(record)
            emit_json(record, cli.out)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return records


def main() -> None:
    cli = parse_args()
    print(f"# {device_name(torch.device('cpu'))}, torch {torch.__version__}, server TP={cli.nproc}, {cli.threads} threads/process", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the server, delete the checkpoint
    workdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        records = [r for shape in cli.shapes for r in bench_shape(shape, cli, workdir)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(records, TABLE), flush=True)


if __name__ == "__main__":
    run_cli(main)
