"""lm-evaluation-harness through serve.py: requests/s of a loglikelihood task.

lm-eval's `local-completions` model sends each loglikelihood request as an echo completion
(prompt = context + continuation ids, max_tokens 1, logprobs 1). This times its request path
(`_loglikelihood_tokens`, what multiple-choice and perplexity tasks call) on --requests
(context, continuation) pairs made from evals/data/stories_mc.jsonl, three ways in the same run
against the same server: one request at a time (lm-eval's default), `--batch_size 4` (four
prompts per HTTP request, admitted into the scheduler together) and `num_concurrent=4` (four
HTTP requests in flight). The server runs on --nproc tensor-parallel ranks.

    python bench/eval_throughput.py                  # 1 rank
    python bench/eval_throughput.py --nproc 2        # 2 ranks (torchrun, gloo)

Prints one JSON line per configuration and a Markdown table with each one's ratio to one at a time.
"""

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402

from bench.common import device_name, emit_json, format_table  # noqa: E402
from bench.serve import free_port, start_server  # noqa: E402
from llama.errors import run_cli  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402

STORIES = REPO / "ckpts" / "stories260K"
MAX_SEQ_LEN = 512
SETTINGS = {"one at a time": (1, 1), "batch_size 4": (4, 1), "num_concurrent 4": (1, 4)}  # (batch_size, num_concurrent)
TABLE = [("tp", "ranks", ""), ("mode", "lm-eval", ""), ("requests", "requests", ""), ("seconds", "s", ".2f"),
         ("req_s", "req/s", ".1f"), ("vs_one", "x one at a time", ".2f")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="tensor-parallel ranks of the server")
    parser.add_argument("--requests", type=int, default=256, help="loglikelihood requests per configuration")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per server process")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    return parser.parse_args()


def requests(n: int) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """lm-eval's encoded loglikelihood requests: the task's (context, " choice") pairs, each
    context behind a different story opening so that no two requests are the same."""
    tok = load_tokenizer(STORIES / "tokenizer.model")
    docs = [json.loads(line) for line in (REPO / "evals" / "data" / "stories_mc.jsonl").read_text().splitlines()]
    pairs = [(doc["context"], " " + choice) for doc in docs for choice in doc["choices"]]
    out = []
    for i in range(n):
        context, continuation = pairs[i % len(pairs)]
        context = f"Story {i // len(pairs)}. {context}"
        context_ids = tok.encode(context, bos=False, eos=False)
        out.append(((context, continuation), context_ids, tok.encode(context + continuation, bos=False, eos=False)[len(context_ids) :]))
    return out


def time_requests(url: str, batch_size: int, concurrent: int, reqs: list) -> float:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="stories260K", max_length=MAX_SEQ_LEN,
                             batch_size=batch_size, num_concurrent=concurrent)
    lm._loglikelihood_tokens(reqs[:8])  # warm up: connections, first prefills
    start = time.perf_counter()
    results = lm._loglikelihood_tokens(reqs)
    seconds = time.perf_counter() - start
    assert len(results) == len(reqs)
    return seconds


def main() -> None:
    cli = parse_args()
    logging.disable(logging.WARNING)  # lm-eval's per-model notes
    print(f"# {device_name(torch.device('cpu'))}, torch {torch.__version__}, server TP={cli.nproc}, {cli.threads} threads/process", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally block: stop the server
    reqs = requests(cli.requests)
    port = free_port()
    server = start_server(STORIES, port, argparse.Namespace(nproc=cli.nproc, clients=[4], threads=cli.threads), MAX_SEQ_LEN)
    records = []
    try:
        for mode, (batch_size, concurrent) in SETTINGS.items():
            seconds = time_requests(f"http://127.0.0.1:{port}", batch_size, concurrent, reqs)
            record = {"tp": cli.nproc, "mode": mode, "requests": len(reqs), "seconds": seconds, "req_s": len(reqs) / seconds}
            record["vs_one"] = record["req_s"] / records[0]["req_s"] if records else 1.0
            records.append(record)
            emit_json(record, cli.out)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(format_table(records, TABLE), flush=True)


if __name__ == "__main__":
    run_cli(main)
