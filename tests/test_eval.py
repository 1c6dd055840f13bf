"""lm-evaluation-harness (its `local-completions` model) against serve.py on 1 and 2 ranks, and the
score API (`Llama.score`) the server's echo shares.

One server per rank count serves the whole module (a module-scoped fixture); lm-eval runs the
three local tasks in evals/ (multiple_choice, loglikelihood_rolling, generate_until) with its
default tokenizer backend (which finds the server's /tokenizer_info and uses it: no download),
once with token-id requests in batches of 4 and once with string requests one at a time.
Every loglikelihood lm-eval reports is checked against `Llama.score` on the ids lm-eval sent,
the perplexity against a direct computation, and the generations against `example.py --json`.

Tolerances. The server scores a prompt in a one-row prefill (at TP=2 with all-reduced partial
sums); `Llama.score` too, on one rank. Both are float32 and differ
only in the order of sums, which moves a stories260K logit (|logit| < 20) by < 1e-4 (the bound
tests/test_serve.py argues: sums of <= 512 terms over 5 layers, a few hundred float32 ulps).
A logprob is logit - logsumexp(logits), so each token's logprob moves by < 2e-4 (TOKEN_ATOL)
and a sum over n tokens by < n * TOKEN_ATOL. Greedy ids are compared only where every step's
top-1 logit beats its top-2 by more than MARGIN (> 10x the logit bound), so no order of sums can
flip them.
"""

import contextlib
import json
import math
import os
import re

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it (lm-eval[api])

from dist_utils import REPO, python, torchrun
from references import GOLDEN, LAST_LOGITS_CASES
from test_serve import start_server, stop_group

from llama import chat, distributed
from llama.generation import Llama
from llama.sampling import Sampling
from llama.engine import Engine, Piece, Request

STORIES = REPO / "ckpts" / "stories260K"
MAX_SEQ_LEN = 512
MAX_QUEUE = 16
TOKEN_ATOL = 2e-4  # per token logprob: see the module note
MARGIN = 1e-3  # top-1 minus top-2 logit: > 10x the 1e-4 logit bound
TASKS = ["stories_mc", "stories_ppl", "stories_gen"]
GEN_TOKENS = 16  # evals/stories_gen.yaml's max_gen_toks
MODES = {  # lm-eval's way of sending requests: token ids in batches of 4, or strings one by one
    "ids-batch4": {"tokenized_requests": True, "batch_size": 4},
    "strings-batch1": {"tokenized_requests": False, "batch_size": 1},
}


@pytest.fixture(scope="module")
def llm():
    """The library on this process (world size 1): the reference the server is checked against."""
    model = Llama.build(STORIES, max_seq_len=MAX_SEQ_LEN, max_batch_size=8)
    yield model
    distributed.teardown()


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def server(request, tmp_path_factory):
    """serve.py on 1 rank (python) or 2 ranks (torchrun, gloo), until the module's tests for it end."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, url = start_server(log, request.param, "--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", "4", "--max_queue", str(MAX_QUEUE))
    try:
        yield url
    finally:
        stop_group(proc)


_runs: dict[tuple[str, str], dict] = {}


def lm_eval_run(url: str, mode: str) -> dict:
    """lm-eval's results and per-sample log for the three tasks (run once per server and mode)."""
    if (url, mode) not in _runs:
        from lm_eval.tasks import TaskManager

        settings = MODES[mode]
        model_args = {"base_url": f"{url}/v1/completions", "model": "stories260K", "max_length": MAX_SEQ_LEN,
                      "tokenized_requests": settings["tokenized_requests"]}
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        with contextlib.chdir(REPO):  # evals/*.yaml name their data files relative to the repo root
            _runs[url, mode] = lm_eval.simple_evaluate(
                model="local-completions", model_args=model_args, tasks=TASKS, batch_size=settings["batch_size"],
                task_manager=TaskManager(include_path=str(REPO / "evals"), include_defaults=False), log_samples=True,
            )
    return _runs[url, mode]


def scored(llm: Llama, ids: list[int], ctxlen: int, tokenized: bool) -> tuple[float, int]:
    """What the server should answer lm-eval for `ids` (its context first, ctxlen tokens): the sum
    of the continuation's logprobs from `Llama.score`, and how many tokens that sums.

    A string request is lm-eval's decode of the ids, which the server encodes with a BOS that it
    does not echo; lm-eval still counts ctxlen tokens of what comes back.
    """
    if tokenized:
        return sum(llm.score([ids])[0][ctxlen:]), len(ids) - ctxlen
    tok = llm.tokenizer
    served = tok.encode(tok.decode(ids), bos=True, eos=False)
    return sum(llm.score([served])[0][1 + ctxlen :]), len(served) - 1 - ctxlen


def encode_pair(llm: Llama, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair with a remote tokenizer (no BOS): trailing spaces of the
    context move to the continuation, whose ids are the whole's after the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    tok = llm.tokenizer
    context_ids = tok.encode(context, bos=False, eos=False)
    return context_ids, tok.encode(context + continuation, bos=False, eos=False)[len(context_ids) :]


# ---------------------------------------------------------------- lm-eval through the server

@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("mode", MODES)
def test_multiple_choice_loglikelihoods_equal_the_score_api(server, llm, mode):
    out = lm_eval_run(server, mode)
    samples = out["samples"]["stories_mc"]
    assert len(samples) == 8
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["filtered_resps"]):
            context_ids, continuation_ids = encode_pair(llm, context, continuation)
            want, n = scored(llm, context_ids + continuation_ids, len(context_ids), MODES[mode]["tokenized_requests"])
            assert n >= 1 and abs(resp[0] - want) < n * TOKEN_ATOL, (context, continuation, resp, want)
    accuracy = sum(s["acc"] for s in samples) / len(samples)
    assert out["results"]["stories_mc"]["acc,none"] == pytest.approx(accuracy)


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("mode", MODES)
def test_perplexity_equals_a_direct_computation(server, llm, mode):
    """Each story is one window (< 510 tokens): lm-eval scores [BOS] + its ids with the BOS as
    context. With string requests the BOS cannot travel in the text, so lm-eval's context count
    of 1 skips the story's first token too (README "Evaluating")."""
    out = lm_eval_run(server, mode)
    tokenized = MODES[mode]["tokenized_requests"]
    samples = out["samples"]["stories_ppl"]
    total_ll, total_words, total_tokens = 0.0, 0, 0
    for sample in samples:
        text = sample["doc"]["text"]
        want, n = scored(llm, [llm.tokenizer.bos_id] + llm.tokenizer.encode(text, bos=False, eos=False), 1, tokenized)
        assert abs(sample["filtered_resps"][0] - want) < n * TOKEN_ATOL, (text[:30], sample["filtered_resps"], want)
        total_ll, total_words, total_tokens = total_ll + want, total_words + len(re.split(r"\s+", text)), total_tokens + n
    # exp(-sum ll / words): the relative error is at most the sum's absolute error divided by the words
    word_ppl = math.exp(-total_ll / total_words)
    got = out["results"]["stories_ppl"]["word_perplexity,none"]
    assert got == pytest.approx(word_ppl, rel=2 * total_tokens * TOKEN_ATOL / total_words)


@pytest.fixture(scope="module")
def example_generations() -> dict[str, dict]:
    """example.py --json (world size 1, greedy) on the generation task's prompts."""
    docs = [json.loads(line) for line in (REPO / "evals" / "data" / "stories_gen.jsonl").read_text().splitlines()]
    prompts = [arg for doc in docs for arg in ("--prompt", doc["prompt"])]
    out = python(REPO / "example.py", "--json", "--max_tokens", str(GEN_TOKENS), "--max_seq_len", str(MAX_SEQ_LEN),
                 "--max_batch_size", str(len(docs)), *prompts, timeout=120)
    assert out.returncode == 0, out.stderr
    return {r["prompt"]: r for r in map(json.loads, out.stdout.splitlines())}


def assert_margins(llm: Llama, prompt_ids: list[int], ids: list[int]) -> None:
    """Every greedy step of `ids` after `prompt_ids` wins by more than MARGIN (module note)."""
    with torch.inference_mode():
        logits = llm.model(torch.tensor([prompt_ids + ids]), 0)[0, len(prompt_ids) - 1 : -1]
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1] > MARGIN).all(), f"near-tie in the greedy continuation of {prompt_ids}"


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("mode", MODES)
def test_generation_equals_example(server, llm, example_generations, mode):
    """Strings: the server adds BOS, as example.py does. Token ids: lm-eval sends the prompt's ids
    without BOS, so the reference is the library's greedy `complete` on those ids."""
    out = lm_eval_run(server, mode)
    for sample in out["samples"]["stories_gen"]:
        prompt = sample["doc"]["prompt"]
        if MODES[mode]["tokenized_requests"]:
            prompt_ids = llm.tokenizer.encode(prompt, bos=False, eos=False)
            (done,) = llm.generate([prompt_ids], Sampling(max_tokens=GEN_TOKENS))
            reference = {"ids": done.ids, "text": done.text}
        else:
            reference = example_generations[prompt]
            prompt_ids = reference["prompt_ids"]
        assert_margins(llm, prompt_ids, reference["ids"])
        assert sample["resps"][0][0] == reference["text"].split(".")[0], prompt  # until "." (evals/stories_gen.yaml)
    assert "exact_match,strip" in out["results"]["stories_gen"]


# ---------------------------------------------------------------- echo, stop tokens, tokenizer endpoints

def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


@pytest.mark.slow
@pytest.mark.server
def test_echo_scores_the_prompt_with_offsets_into_the_text(server, llm):
    """max_tokens 0 with echo: the prompt's logprobs only, as `Llama.score` gives them; the BOS the
    server adds to a string is not echoed; each token keeps its leading space, so text_offset
    indexes `text`. Token ids are echoed whole, their first token with null logprobs."""
    text = "Lily and Tom went to the park. They saw a big dog."
    ids = llm.tokenizer.encode(text, bos=True, eos=False)
    want = llm.score([ids])[0]
    body = {"max_tokens": 0, "echo": True, "logprobs": 1}
    string_choice, ids_choice = (post(server, "/v1/completions", {**body, "prompt": p}).json()["choices"][0] for p in (text, ids))
    for choice, expected in ((string_choice, want[1:]), (ids_choice, want)):
        lp = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert len(lp["token_logprobs"]) == len(expected)
        for got, ref in zip(lp["token_logprobs"], expected):
            assert (got is None and ref is None) or abs(got - ref) < TOKEN_ATOL
        assert "".join(lp["tokens"]) == text
        assert all(text[o : o + len(t)] == t for o, t in zip(lp["text_offset"], lp["tokens"]))
    assert ids_choice["logprobs"]["top_logprobs"][0] is None and ids_choice["logprobs"]["tokens"][0] == ""
    plain = post(server, "/v1/completions", {"prompt": text, "max_tokens": 3, "echo": True, "temperature": 0}).json()["choices"][0]
    assert plain["text"].startswith(text) and len(plain["text"]) > len(text) and plain["logprobs"] is None


def test_stop_token_keeps_its_logprob_entry(llm):
    """The scheduler given logits whose argmax is EOS (stories260K ends its stories with BOS, as
    llama2.c trained it, so greedy decoding never meets EOS): the last piece finishes with "stop",
    adds no id, and still carries EOS's logprob (lm-eval drops an echo's last entry, taking it
    for the generated token)."""
    received: list[Piece] = []
    scheduler = Engine(llm.model, llm.tokenizer, llm.parallel.device, max_queue=1).scheduler
    scheduler.add([Request([1, 403], Sampling(max_tokens=4, temperature=0, top_logprobs=1), on_piece=received.append)])
    step = scheduler.schedule()
    logits = torch.zeros(llm.model.args.vocab_size)
    logits[llm.tokenizer.eos_id] = 5.0
    scheduler.finish_step(step, [logits], None)
    (piece,) = received
    assert (piece.finish_reason, piece.ids, [lp.id for lp in piece.logprobs]) == ("stop", [], [llm.tokenizer.eos_id])
    assert piece.logprobs[0].logprob == pytest.approx(torch.log_softmax(logits, -1)[llm.tokenizer.eos_id].item())


@pytest.mark.slow
@pytest.mark.server
def test_tokenizer_endpoints_speak_vllm_and_lm_eval_finds_them(server, llm):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    tok = llm.tokenizer
    assert check_remote_tokenizer_support(f"{server}/v1/completions")
    remote = RemoteTokenizer(f"{server}/v1/completions")
    assert (remote.bos_token_id, remote.eos_token_id) == (tok.bos_id, tok.eos_id)  # found by tokenizing "<s>", "</s>"
    info = httpx.get(f"{server}/tokenizer_info", timeout=10).json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", None)
    assert info["chat_template"] == chat.LLAMA2_CHAT_TEMPLATE and info["model_max_length"] == MAX_SEQ_LEN
    text = "Once upon a time, Lily's <s> dog said \"hi\"."
    with_bos = post(server, "/tokenize", {"prompt": text}).json()
    assert with_bos == {"tokens": tok.encode(text, bos=True, eos=False), "count": len(with_bos["tokens"]), "max_model_len": MAX_SEQ_LEN}
    assert remote.encode(text) == tok.encode(text, bos=False, eos=False)  # special-token text inside a prompt stays text
    messages = [{"role": "user", "content": "Tell me a story."}]
    assert post(server, "/tokenize", {"messages": messages}).json()["tokens"] == llm.chat_tokens(messages)
    assert remote.decode(with_bos["tokens"]) == text


BAD_REQUESTS = [  # (name, path, body, param)
    (f"a prompt list longer than --max_queue {MAX_QUEUE} (400: no retry could fit it)", "/v1/completions",
     {"prompt": ["x"] * (MAX_QUEUE + 1)}, "prompt"),
    ("ids out of the vocabulary", "/v1/completions", {"prompt": [1, 512]}, "prompt"),
    ("negative id in a list of id lists", "/v1/completions", {"prompt": [[1, 2], [1, -1]]}, "prompt"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, "prompt"),
    ("empty id list in a list", "/v1/completions", {"prompt": [[]]}, "prompt"),
    ("mixed strings and ids", "/v1/completions", {"prompt": ["x", [1, 2]]}, "prompt"),
    ("echo with stream", "/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "stream"),
    ("a list of prompts with stream", "/v1/completions", {"prompt": ["x", "y"], "stream": True}, "stream"),
    ("max_tokens 0 without echo", "/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("echo of a prompt that fills max_seq_len, with a token to generate", "/v1/completions",
     {"prompt": [1] * MAX_SEQ_LEN, "echo": True, "max_tokens": 1}, "prompt"),
    ("detokenize ids out of the vocabulary", "/detokenize", {"tokens": [1, 600]}, "tokens"),
    ("tokenize with neither prompt nor messages", "/tokenize", {}, "prompt"),
]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("name,path,body,param", BAD_REQUESTS, ids=[b[0].split(" (")[0] for b in BAD_REQUESTS])
def test_bad_request_gets_400_and_server_keeps_serving(server, name, path, body, param):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param, error
    ok = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------- the score API itself

@pytest.mark.slow
def test_score_matches_llama2c_logits(llm):
    """Llama.score against llama2.c's own last-position logits (tests/data/golden.json): the logprob
    of every vocabulary entry after each golden prompt. llama2.c's logits agree with ours to 1e-4
    (tests/references.py), so a logprob (logit - logsumexp) to 2e-4."""
    cases = [GOLDEN[name] for name in LAST_LOGITS_CASES]
    seqs = [case["prompt_ids"] + [token] for case in cases for token in range(0, 512, 37)]
    scores = llm.score(seqs)
    for i, case in enumerate(cases):
        want = torch.log_softmax(torch.tensor(case["logits"], dtype=torch.float64), dim=-1)
        for j, token in enumerate(range(0, 512, 37)):
            row = scores[i * 14 + j]
            assert row[0] is None and len(row) == len(case["prompt_ids"]) + 1
            assert abs(row[-1] - want[token].item()) < 2e-4, (case["name"], token)


@pytest.mark.slow
@pytest.mark.dist
def test_score_on_two_ranks_equals_one(llm):
    """`Llama.score` called on every rank of a torchrun job (TP=2) gives rank 0 the 1-rank scores."""
    seqs = [llm.tokenizer.encode(t, bos=True, eos=False) for t in ("Once upon a time", "The cat sat on the mat. It was", "Hi")]
    out = torchrun(2, REPO / "tests" / "eval_worker.py", json.dumps(seqs), timeout=120)
    assert out.returncode == 0, out.stderr
    for got, want in zip(json.loads(out.stdout), llm.score(seqs)):
        assert got[0] is None and len(got) == len(want)
        assert all(abs(g - w) < TOKEN_ATOL for g, w in zip(got[1:], want[1:]))


@pytest.mark.slow
def test_score_rejects_bad_sequences(llm):
    from llama.errors import UserError

    with pytest.raises(UserError, match="prompt 1 is empty"):
        llm.score([[1, 2], []])
    with pytest.raises(UserError, match=r"has token ids outside the vocabulary \[0, 512\)"):
        llm.score([[1, 512]])
    with pytest.raises(UserError, match=f"--max_seq_len is {MAX_SEQ_LEN}"):
        llm.score([[1] * (MAX_SEQ_LEN + 1)])
