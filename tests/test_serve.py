"""The OpenAI-compatible server (serve.py) against example.py and the official `openai` client.

One `torchrun --nproc_per_node 2 serve.py` job (gloo, CPU) serves the whole module; its
completions are compared with `example.py --json` (a separate world-size-1 process). The
in-process tests at the top check the per-row decoding step and the scheduler's pieces.

Exact greedy ids across different arithmetic: the server decodes with TP=2 (all-reduced
partial sums), several rows per step and attention over the whole masked cache; example.py
with TP=1, one prompt batch and attention over the filled positions only. Each difference only
reorders float32 sums, which moves a stories260K logit (|logit| < ~20, sums of <= 512 terms
over 5 layers) by well under 1e-4 (a few hundred float32 ulps at 20). Wherever the top-1 and
top-2 logits of a step are more than MARGIN apart the argmax cannot differ, so every compared
step is checked for that margin with the server's own top-2 logprobs (their difference is the
logit difference). The golden data's one near-tie, margin 0.0042 at position 185 of the BOS run,
would still pass; an actual tie would fail the margin check, not silently compare ids.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")  # the test extra: the server's stack and the official client
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from dist_utils import REPO, free_port, python

from llama import distributed
from llama.engine import Engine, Piece, QueueFull, Request, ShuttingDown, safe_end, stop_string_end
from llama.formats import adapters
from llama.generation import Llama
from llama.sampling import Sampling

MARGIN = 1e-3  # > 10x the largest reordering error argued above
API_KEY = "sk-test-key"
MAX_SEQ_LEN = 256
PROMPTS = {  # prompt -> max_tokens: different prompt lengths and completion lengths
    "Once upon a time": 64,
    "Lily and Tom went to the park": 40,
    "The cat": 52,
    "One day, a little boy named Tim found a big red ball in the garden": 30,
}
CHAT_USER = "Tell me a story about a dog."
STORIES = REPO / "ckpts" / "stories260K"


# ---------------------------------------------------------------- in-process: the server over the engine

@pytest.fixture(scope="module")
def stories_llm():
    llm = Llama.build(STORIES, max_seq_len=64, max_batch_size=4)
    yield llm
    distributed.teardown()


@contextlib.contextmanager
def in_process_server(llm: Llama, max_queue: int = 8):
    """The FastAPI app over its own engine, the engine's step loop on a thread (world size 1)."""
    from fastapi.testclient import TestClient

    from llama.serving.app import Server

    engine = Engine(llm.model, llm.tokenizer, llm.parallel.device, seed=None, max_queue=max_queue)
    loop = threading.Thread(target=engine.serve_steps, kwargs={"leader": True, "heartbeat_s": 0.05}, daemon=True)
    loop.start()
    try:
        with TestClient(Server(llm, engine.scheduler, "stories260K", None).app) as http:
            yield http
    finally:
        engine.scheduler.stop()
        loop.join()


@pytest.mark.slow
def test_server_and_library_return_the_same_ids_and_logprobs(stories_llm):
    """The server is a client of the same engine as Llama.generate: for the same requests (greedy, and
    sampled with a seed) it returns identical ids and logprobs, bit for bit (one process, one rank)."""
    prompts = {"Once upon a time": (24, 0.0, None), "The cat": (17, 1.0, 5), "Lily and Tom went to the park": (30, 0.8, 11)}
    with in_process_server(stories_llm) as http:
        served = {p: http.post("/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": t, "seed": seed, "logprobs": 2,
                                                        "return_token_ids": True}).json()["choices"][0]
                  for p, (n, t, seed) in prompts.items()}
    for prompt, (n, temperature, seed) in prompts.items():
        ids = stories_llm.tokenizer.encode(prompt, bos=True, eos=False)
        (library,) = stories_llm.generate([ids], Sampling(max_tokens=n, temperature=temperature, seed=seed, top_logprobs=2))
        choice = served[prompt]
        assert choice["token_ids"] == library.ids and choice["text"] == library.text
        assert choice["logprobs"]["token_logprobs"] == [lp.logprob for lp in library.logprobs]


def test_chat_logprobs_read_each_token_in_context(stories_llm):
    """Chat logprob tokens keep their spaces: they join to the content, their bytes to its UTF-8
    (each token decoded alone lost SentencePiece's leading space)."""
    body = {"messages": [{"role": "user", "content": "Tell me a story about a dog."}], "max_tokens": 24, "temperature": 0,
            "logprobs": True, "top_logprobs": 1}
    with in_process_server(stories_llm) as http:
        choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    content, entries = choice["message"]["content"], choice["logprobs"]["content"]
    assert " " in content and "".join(e["token"] for e in entries) == content
    assert bytes(b for e in entries for b in e["bytes"]) == content.encode()
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in entries), "greedy: the top alternative is the token itself"


def test_large_requests_are_refused_early_and_tokenizing_leaves_the_event_loop(stories_llm, monkeypatch):
    """A body over --max_request_size gets 413 (OpenAI's error shape) without being parsed; a string
    longer than max_seq_len tokens could hold gets 400 without being tokenized; and what is
    tokenized is tokenized on a worker thread, not on the event loop that serves the other requests."""
    import asyncio

    from llama.serving.app import MAX_REQUEST_BYTES

    calls = []
    encode = stories_llm.tokenizer.encode

    def spy(text, bos, eos):
        try:
            asyncio.get_running_loop()
            calls.append("event loop")
        except RuntimeError:
            calls.append("worker thread")
        return encode(text, bos, eos)

    monkeypatch.setattr(stories_llm.tokenizer, "encode", spy)
    with in_process_server(stories_llm) as http:
        big = http.post("/v1/completions", content=b"{" + b" " * MAX_REQUEST_BYTES + b"}", headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large", big.text
        room = 64 * stories_llm.tokenizer.max_token_chars  # the fixture's max_seq_len
        long = http.post("/v1/completions", json={"prompt": "a" * (room + 1), "max_tokens": 2})
        assert long.status_code == 400 and long.json()["error"]["param"] == "prompt" and "characters" in long.json()["error"]["message"]
        assert calls == [], "refused before tokenizing"
        ok = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 2})
        assert ok.status_code == 200 and calls == ["worker thread"]


def test_nan_temperature_is_refused_as_not_finite(stories_llm):
    """`temperature: NaN` (Python's json writes it) is not a number to sample with: 400 saying so, not "should be <= 2"."""
    with in_process_server(stories_llm) as http:
        bad = http.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}', headers={"Content-Type": "application/json"})
    error = bad.json()["error"]
    assert bad.status_code == 400 and error["param"] == "temperature" and "finite" in error["message"], bad.text


def test_stop_strings_and_held_back_text():
    assert stop_string_end("a cat. The dog", ("dog", "."), 0) == 5
    assert stop_string_end("a cat", ("dog",), 0) is None
    assert safe_end("a big do", ("dog",)) == len("a big ")  # "do" may start "dog"
    assert safe_end("caf\ufffd", ()) == 3  # a character still missing bytes
    assert safe_end("plain", ("xyz",)) == 5


def test_queue_bound_and_shutdown(stories_llm):
    """No step loop runs, so nothing leaves the queue: the second request finds it full."""
    scheduler = Engine(stories_llm.model, stories_llm.tokenizer, stories_llm.parallel.device, max_queue=1).scheduler
    received: list[Piece] = []
    scheduler.add([Request([1, 2], Sampling(max_tokens=4), on_piece=received.append)])
    with pytest.raises(QueueFull):
        scheduler.add([Request([1, 2], Sampling(max_tokens=4))])
    scheduler.stop()
    assert scheduler.schedule().stop and received[0].finish_reason == "cancelled"
    with pytest.raises(ShuttingDown):
        scheduler.add([Request([1, 2], Sampling(max_tokens=4))])


# ---------------------------------------------------------------- the served job

@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: Path


def start_server(log: Path, nproc: int, *args: str) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port (torchrun for nproc > 1), once /health answers.

    Its output goes to `log` (a pipe nobody reads could fill and block the server); its own
    session lets teardown end the launcher and its workers together, whatever happened."""
    port = free_port()
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "serve.py", "--port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve.py exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_group(proc)
            pytest.fail("serve.py did not answer /health within 120 s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`torchrun --nproc_per_node 2 serve.py`, until the module's last test stops it."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--max_batch_size", "4", "--max_seq_len", str(MAX_SEQ_LEN), "--api_key", API_KEY, "--shutdown_timeout", "2"]
    proc, url = start_server(log, 2, *args)
    try:
        yield Served(proc, url, log)
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the launcher and its workers (one process group), then SIGKILL to any left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def example_json(*args: str) -> dict[str, dict]:
    """example.py --json results by prompt (world size 1: the reference run)."""
    out = python(REPO / "example.py", "--json", "--max_seq_len", str(MAX_SEQ_LEN), *args, timeout=120)
    assert out.returncode == 0, out.stderr
    return {r["prompt"]: r for r in map(json.loads, out.stdout.splitlines())}


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    return example_json("--max_tokens", str(max(PROMPTS.values())), *prompts)


def assert_margins(top_logprobs: list[dict[str, float]]) -> None:
    """Every step's top-1 beats its top-2 by more than MARGIN (see the module note)."""
    for step, top in enumerate(top_logprobs):
        first, second = sorted(top.values(), reverse=True)[:2]
        assert first - second > MARGIN, f"near-tie at generated token {step}: {top}"


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def complete(client: openai.OpenAI, prompt: str, max_tokens: int, **kwargs):
    return client.completions.create(
        model="stories260K", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=2,
        extra_body={"return_token_ids": True}, **kwargs,
    )


@pytest.mark.slow
@pytest.mark.server
def test_greedy_completion_equals_example(client, reference):
    prompt = "Once upon a time"
    choice = complete(client, prompt, PROMPTS[prompt]).choices[0]
    assert choice.prompt_token_ids == reference[prompt]["prompt_ids"]
    assert len(choice.logprobs.top_logprobs) == len(choice.token_ids)
    assert_margins(choice.logprobs.top_logprobs)
    assert choice.token_ids == reference[prompt]["ids"]
    assert choice.text == reference[prompt]["text"]
    assert choice.finish_reason == "length"


@pytest.mark.slow
@pytest.mark.server
def test_stream_concatenates_to_the_same_text(client, reference):
    prompt = "Once upon a time"
    chunks = list(client.completions.create(model="stories260K", prompt=prompt, max_tokens=PROMPTS[prompt], temperature=0, stream=True))
    assert len(chunks) > 10  # really streamed, not one chunk
    assert "".join(c.choices[0].text for c in chunks) == reference[prompt]["text"]
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


@pytest.mark.slow
@pytest.mark.server
def test_stop_string_ends_the_text_before_it(client, reference):
    prompt = "Once upon a time"
    full = reference[prompt]["text"]
    choice = client.completions.create(model="stories260K", prompt=prompt, max_tokens=64, temperature=0, stop=[" Lily"]).choices[0]
    assert (choice.text, choice.finish_reason) == (full[: full.index(" Lily")], "stop")


@pytest.mark.slow
@pytest.mark.server
def test_chat_uses_the_chat_template(client):
    expected = next(iter(example_json("--chat", "--max_tokens", "16", "--prompt", CHAT_USER).values()))
    response = client.chat.completions.create(
        model="stories260K", messages=[{"role": "user", "content": CHAT_USER}], max_tokens=16, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    assert choice.prompt_token_ids == expected["prompt_ids"]
    assert_margins([{t.token + str(i): t.logprob for i, t in enumerate(step.top_logprobs)} for step in choice.logprobs.content])
    assert choice.token_ids == expected["ids"]
    assert choice.message.content == expected["text"]
    assert response.usage.prompt_tokens == len(expected["prompt_ids"])


@pytest.mark.slow
@pytest.mark.server
def test_concurrent_clients_get_what_they_get_alone_in_shared_steps(server, client, reference):
    url = server.url
    before = health(url)
    start = threading.Barrier(len(PROMPTS))

    def run(prompt: str, max_tokens: int):
        start.wait()
        return complete(client, prompt, max_tokens).choices[0]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        choices = list(pool.map(run, PROMPTS, PROMPTS.values()))
    after = health(url)
    for (prompt, max_tokens), choice in zip(PROMPTS.items(), choices):
        assert_margins(choice.logprobs.top_logprobs)
        assert choice.token_ids == reference[prompt]["ids"][:max_tokens], prompt
        assert reference[prompt]["text"].startswith(choice.text)
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_tokens"] - before["decoded_tokens"]
    generated = sum(len(c.token_ids) for c in choices)
    # each first token comes from its prefill (and none of these meets EOS within max_tokens)
    assert generated == sum(PROMPTS.values()) and rows == generated - len(PROMPTS)
    # Rows decoded beyond one per step: 0 if no two requests ever shared a step, 182 - 63 = 119
    # if all four joined the first step. Requests that reach the engine a few steps apart (HTTP
    # handling on a loaded machine) still share most steps; 20 leaves room for that.
    assert rows - steps >= 20, (steps, rows)


BAD_REQUESTS = [  # (name, path, headers, body, status, param)
    ("malformed JSON", "/v1/completions", {}, b'{"prompt": "x", ', 400, None),
    ("prompt of wrong type", "/v1/completions", {}, {"prompt": 5}, 400, "prompt"),
    ("max_tokens a string", "/v1/completions", {}, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature a string", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ("messages not a list", "/v1/chat/completions", {}, {"messages": "hello"}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {}, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("assistant last", "/v1/chat/completions", {}, {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("prompt too long", "/v1/completions", {}, {"prompt": [1] * MAX_SEQ_LEN}, 400, "prompt"),
    ("max_tokens 0", "/v1/completions", {}, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, 400, "max_tokens"),
    ("n = 2", "/v1/completions", {}, {"prompt": "x", "n": 2}, 400, "n"),
    ("missing API key", "/v1/completions", {"Authorization": None}, {"prompt": "x"}, 401, None),
    ("wrong API key", "/v1/completions", {"Authorization": "Bearer nope"}, {"prompt": "x"}, 401, None),
    ("unknown path", "/v1/engines", {}, {}, 404, None),
]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("name,path,headers,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_4xx_and_server_keeps_serving(server, client, name, path, headers, body, status, param):
    url = server.url
    all_headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers}
    all_headers = {k: v for k, v in all_headers.items() if v is not None}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}{path}", content=content, headers=all_headers, timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    assert complete(client, "Once upon a time", 2).choices[0].finish_reason == "length"


@pytest.mark.slow
@pytest.mark.server
def test_openai_client_raises_its_own_error_classes(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_seq_len"):
        good.completions.create(model="stories260K", prompt=[1] * MAX_SEQ_LEN, max_tokens=4)
    assert [m.id for m in good.models.list()] == ["stories260K"]


@pytest.mark.slow
@pytest.mark.server
def test_disconnect_mid_stream_frees_the_row(server, client, reference):
    """A client hangs up after its first chunk of a 250-token stream; another request started
    meanwhile still completes, and the row is freed long before 250 steps would have run."""
    url = server.url
    before = health(url)
    body = {"prompt": "Once upon a time", "max_tokens": MAX_SEQ_LEN - 6, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            other = pool.submit(complete, client, "The cat", PROMPTS["The cat"])
        choice = other.result(timeout=30).choices[0]
    assert choice.token_ids == reference["The cat"]["ids"][: PROMPTS["The cat"]]
    deadline = time.monotonic() + 10
    while (now := health(url))["active"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["active"] == 0 and now["cancelled"] == before["cancelled"] + 1
    assert now["decoded_tokens"] - before["decoded_tokens"] < 200  # the hung-up stream stopped early


@pytest.mark.slow
@pytest.mark.server
def test_full_queue_gets_503_and_a_freed_row_admits_the_next(tmp_path):
    """One row, a queue of one (`python serve.py`, world size 1): a long stream holds the row,
    a second request waits, a third gets 503; when the stream hangs up the waiting one runs."""
    # 1000 greedy tokens without EOS (checked with example.py) hold the row for ~2 s or more
    proc, url = start_server(tmp_path / "serve.log", 1, "--max_batch_size", "1", "--max_queue", "1", "--max_seq_len", "1024")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "stream": True}
        short = {"prompt": "The cat", "max_tokens": 8, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                lines = response.iter_lines()  # held: a dropped line iterator closes the response
                next(lines)
                waiting = pool.submit(httpx.post, f"{url}/v1/completions", json=short, timeout=30)
                deadline = time.monotonic() + 10
                while (now := health(url))["queued"] != 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert now["queued"] == 1 and now["active"] == 1, now
                busy = httpx.post(f"{url}/v1/completions", json=short, timeout=30)
                assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded", busy.text
            done = waiting.result(timeout=30)
        assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
    finally:
        stop_group(proc)


def worker_pids(parent: int) -> list[int]:
    """The torchrun job's worker processes (children of the launcher)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the torchrun workers through /proc")
def test_sigterm_stops_every_rank_cleanly(server):
    """SIGTERM to every rank (what torchrun does on its own SIGTERM) with a stream in flight:
    the stream finishes, or after --shutdown_timeout (2 s) ends with an error event; every
    worker exits 0 (so torchrun does too), all within a few seconds."""
    proc, url = server.proc, server.url
    body = {"prompt": "Once upon a time", "max_tokens": MAX_SEQ_LEN - 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        pids = worker_pids(proc.pid)
        assert len(pids) == 2
        start = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        last = list(lines)[-2]  # complete, not cut: [DONE] or the shutdown's error event, then a blank line
    assert last == "data: [DONE]" or "shutting down" in json.loads(last[6:])["error"]["message"], last
    proc.wait(timeout=15)
    output = server.log.read_text()
    assert proc.returncode == 0, output
    assert time.monotonic() - start < 10
    assert "stopped: all 2 ranks left the step loop" in output
    assert "Traceback" not in output


@pytest.mark.slow
@pytest.mark.server
def test_lora_adapter_is_served_as_example_ft_runs_it(tmp_path):
    """`serve.py --adapter adapter.pt` (2 ranks, each its LoRA slices) completes a prompt with the
    ids `example_ft.py --adapter` gives on 1 rank, and they differ from the base model's."""
    gen = torch.Generator().manual_seed(0)
    full = {}
    for layer in range(5):  # stories260K: dim 64, kv dim 32, hidden 172; random A and B so the adapter matters
        for name, (n_in, n_out) in {"attention.wq": (64, 64), "attention.wv": (64, 32), "feed_forward.w2": (172, 64)}.items():
            full[f"layers.{layer}.{name}.lora.A"] = torch.randn(4, n_in, generator=gen) / n_in**0.5
            full[f"layers.{layer}.{name}.lora.B"] = torch.randn(n_out, 4, generator=gen)
    adapter = adapters.save_adapter(full, {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", "w2"]}, tmp_path / "adapter.pt")
    prompt, n = "Once upon a time", 24
    tuned = python(REPO / "example_ft.py", "--adapter", adapter, "--template", "plain", "--instruction", prompt,
                   "--json", "--max_tokens", str(n), "--max_seq_len", str(MAX_SEQ_LEN), timeout=120)
    assert tuned.returncode == 0, tuned.stderr
    expected = json.loads(tuned.stdout)
    proc, url = start_server(tmp_path / "serve.log", 2, "--adapter", str(adapter), "--max_seq_len", str(MAX_SEQ_LEN))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        done = complete(client, prompt, n).choices[0]
    finally:
        stop_group(proc)
    assert done.prompt_token_ids == expected["prompt_ids"]
    assert_margins(done.logprobs.top_logprobs)  # TP=2 vs 1 rank only reorders float32 sums
    assert done.token_ids == expected["ids"]
    base = example_json("--prompt", prompt, "--max_tokens", str(n))[prompt]["ids"]
    assert base != expected["ids"], "the adapter should change the greedy continuation"


BAD_OPTIONS = {  # serve.py option -> what its one error line says; all refused before anything is loaded or bound
    "--max_queue 0": (["--max_queue", "0"], "--max_queue must be at least 1"),
    "--port 99999": (["--port", "99999"], "--port must be in 0..65535"),
    "--port -5": (["--port", "-5"], "--port must be in 0..65535"),
    "--log_level loud": (["--log_level", "loud"], "invalid choice: 'loud'"),
    "--shutdown_timeout -1": (["--shutdown_timeout", "-1"], "--shutdown_timeout must be 0 or more"),
    "missing adapter": (["--adapter", "missing.pt"], "adapter missing.pt not found"),
}


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("name", BAD_OPTIONS)
def test_bad_server_option_is_one_clear_error(name):
    args, message = BAD_OPTIONS[name]
    out = python(REPO / "serve.py", *args, timeout=60)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow
@pytest.mark.server
def test_serving_a_soft_prompt_is_one_clear_error(tmp_path):
    from llama.tuning.prompt import SoftPrompt, save_prompt

    path = save_prompt(SoftPrompt(torch.zeros(4, 64)), tmp_path / "prompt.pt")
    out = python(REPO / "serve.py", "--adapter", path, "--port", str(free_port()), timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a LoRA adapter" in out.stderr, out.stderr
