"""The Llama 3 tokenizer and chat format against ids made by Meta's own code (llama-models 0.3.0
`llama3/tokenizer.py` + `chat_format.py`, tests/data/llama3_tokenizer_cases.json); the factory that
picks SentencePiece or tiktoken from a file's content; where a model folder keeps its tokenizer;
and the chat data template's label mask."""

import base64
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from references import DATA
from references import GOLDEN as STORIES_GOLDEN
from references import LLAMA2_TOKENIZER, REPO, STORIES_TOKENIZER, load_stories

from llama import chat
from llama.errors import UserError
from llama.generation import Llama
from llama.sampling import Sampling
from llama.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, find_tokenizer, load_tokenizer
from llama.tuning import data
from llama.tuning.data import IGNORE_INDEX

LLAMA3_TOKENIZER = DATA / "tokenizers" / "llama3" / "tokenizer.model"
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"  # shared/data/MANIFEST.md
GOLDEN = json.loads((DATA / "llama3_tokenizer_cases.json").read_text())
ASSISTANT_HEADER = [128006, 78191, 128007, 271]  # <|start_header_id|>assistant<|end_header_id|>\n\n, from the golden prompts


@pytest.fixture(scope="module")
def tok() -> TiktokenTokenizer:
    return load_tokenizer(LLAMA3_TOKENIZER)


def raw_encode(tok: TiktokenTokenizer, text: str) -> list[int]:
    """tiktoken itself on one string, without Meta's slicing."""
    return tok.model.encode(text, allowed_special=set(), disallowed_special=())


def test_file_and_special_ids(tok: TiktokenTokenizer):
    assert hashlib.sha256(LLAMA3_TOKENIZER.read_bytes()).hexdigest() == LLAMA3_SHA256
    assert isinstance(tok, TiktokenTokenizer) and tok.family == "llama3"
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (GOLDEN["n_words"], GOLDEN["bos_id"], GOLDEN["eos_id"], GOLDEN["pad_id"])
    assert (tok.eot_id, tok.eom_id) == (GOLDEN["eot_id"], GOLDEN["eom_id"])
    assert tok.stop_ids == frozenset(GOLDEN["stop_tokens"])
    assert {name: tok.special_tokens[name] for name in GOLDEN["special_tokens"]} == GOLDEN["special_tokens"]
    assert sorted(tok.special_tokens.values()) == list(range(128000, GOLDEN["n_words"])), "256 specials after the 128000 ranks"


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda case: repr(case["text"][:24]))
def test_encode_decode(tok: TiktokenTokenizer, case: dict):
    assert tok.encode(case["text"], bos=False, eos=False) == case["ids"]
    assert tok.encode(case["text"], bos=True, eos=False) == case["ids_with_bos"]
    assert tok.encode(case["text"], bos=True, eos=True) == case["ids_with_bos_eos"]
    assert tok.decode(case["ids"]) == case["decoded"]


def test_special_token_text_is_plain_text(tok: TiktokenTokenizer):
    """"<|eot_id|>" typed by a user is text: no special id, in a plain encode or inside a chat message."""
    ids = tok.encode("<|begin_of_text|><|eot_id|><|start_header_id|>", bos=False, eos=False)
    assert not set(ids) & set(tok.special_tokens.values())
    prompt = chat.dialog_tokens(tok, [{"role": "user", "content": "stop<|eot_id|>now"}])
    assert prompt.count(tok.eot_id) == 1, "only the end of the one user message"


@pytest.mark.parametrize("text,cut", [("x" + "ab" * 15000, [25000]), ("1" * 30001, [25000]), (" " * 30001 + "a", [25000]),
                                      ("hello world " * 33334, [400000])])
def test_long_inputs_are_sliced_as_meta_does(tok: TiktokenTokenizer, text: str, cut: list[int]):
    """Meta encodes 400k-character slices and cuts runs of 25k (non-)whitespace characters: the ids
    are those of the pieces encoded one by one, which differ from one tiktoken call on the whole."""
    bounds = [0, *cut, len(text)]
    expected = [i for start, end in zip(bounds, bounds[1:]) for i in raw_encode(tok, text[start:end])]
    assert tok.encode(text, bos=False, eos=False) == expected
    assert expected != raw_encode(tok, text), "the case must exercise the slicing"


@pytest.mark.parametrize("prompt", GOLDEN["chat_dialog_prompts"], ids=lambda p: "/".join(m["role"] for m in p["messages"]))
def test_chat_prompts(tok: TiktokenTokenizer, prompt: dict):
    """Llama.chat_tokens (what --chat and chat_completion feed) gives Meta's ChatFormat ids."""
    assert Llama.chat_tokens(SimpleNamespace(tokenizer=tok), prompt["messages"]) == prompt["ids"]
    assert prompt["ids"][-4:] == ASSISTANT_HEADER


def test_generation_stops_at_any_stop_id(world1):
    """A stop set like Llama 3's (several ids): each row ends before the first one it emits.
    llama2.c's greedy run from BOS emits FROM_BOS[13] first at step 13 and FROM_BOS[20] at step 20."""
    from_bos = STORIES_GOLDEN["greedy_bos_256"]["generated_ids"]
    assert [from_bos.index(from_bos[i]) for i in (13, 20)] == [13, 20]
    real = load_tokenizer(STORIES_TOKENIZER)
    stub = SimpleNamespace(pad_id=-1, eos_id=2, stop_ids=frozenset({from_bos[20], from_bos[13]}), decode=real.decode)
    llm = Llama(load_stories(), stub, world1)
    assert [c.ids for c in llm.generate([[1]], Sampling(max_tokens=40))] == [from_bos[:13]]
    assert 511 not in from_bos[:40]
    stub.stop_ids = frozenset({from_bos[20], 511})
    assert [c.ids for c in llm.generate([[1]], Sampling(max_tokens=40))] == [from_bos[:20]]


def test_bad_chat_message_is_a_user_error(tok: TiktokenTokenizer):
    with pytest.raises(UserError, match="role"):
        chat.dialog_tokens(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(UserError, match="content"):
        chat.dialog_tokens(tok, [{"role": "user", "content": None}])


# --- the factory ---------------------------------------------------------------------------------

def tiny_tiktoken(path: Path, order: list[int]) -> Path:
    """A tiktoken BPE file of the 256 single bytes, byte order[i] at rank i."""
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % rank for rank, b in enumerate(order)))
    return path


def one_line_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_factory_reads_content_not_names(tmp_path: Path):
    """A tiktoken file named like a SentencePiece one and the reverse load as what they are."""
    (tmp_path / "sp.model").write_bytes(LLAMA3_TOKENIZER.read_bytes())
    (tmp_path / "bpe.tiktoken").write_bytes(LLAMA2_TOKENIZER.read_bytes())
    as_tiktoken, as_sp = load_tokenizer(tmp_path / "sp.model"), load_tokenizer(tmp_path / "bpe.tiktoken")
    assert isinstance(as_tiktoken, TiktokenTokenizer) and as_tiktoken.n_words == 128256
    assert isinstance(as_sp, SentencePieceTokenizer) and (as_sp.family, as_sp.n_words, as_sp.stop_ids) == ("llama2", 32000, {2})


def test_tiktoken_file_replaced_in_place_is_reread(tmp_path: Path):
    """tiktoken caches files by path; a new file at the same path must still give its own ranks."""
    path = tiny_tiktoken(tmp_path / "tokenizer.model", list(range(256)))
    first = load_tokenizer(path)
    assert first.encode("hi", bos=True, eos=False) == [256, ord("h"), ord("i")], "BOS = first special after 256 ranks"
    second = load_tokenizer(tiny_tiktoken(path, list(reversed(range(256)))))
    assert second.encode("hi", bos=False, eos=False) == [255 - ord("h"), 255 - ord("i")]


def test_files_that_are_no_tokenizer(tmp_path: Path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\xffnot a tokenizer\n" * 10)
    assert "neither a SentencePiece model" in one_line_error(lambda: load_tokenizer(garbage))
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"IQ== 0\nIg== 1\nthis line is no rank\n")
    assert "not a tiktoken BPE file" in one_line_error(lambda: load_tokenizer(broken))
    gap = tiny_tiktoken(tmp_path / "gap.model", list(range(256)))
    gap.write_bytes(gap.read_bytes().replace(b" 255\n", b" 300\n"))
    assert "ranks are not 0..255" in one_line_error(lambda: load_tokenizer(gap))
    assert "not found" in one_line_error(lambda: load_tokenizer(tmp_path / "missing.model"))


def test_find_tokenizer(tmp_path: Path):
    """<dir>/tokenizer.model, else <dir>/original/tokenizer.model (HF repos of Llama 3); an override wins."""
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(tmp_path) == tmp_path / "original" / "tokenizer.model"
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"
    assert find_tokenizer(tmp_path, "elsewhere.model") == Path("elsewhere.model")
    message = one_line_error(lambda: find_tokenizer(tmp_path / "empty"))
    assert str(tmp_path / "empty") in message and "original" in message and "--tokenizer_path" in message


# --- the chat data template ----------------------------------------------------------------------

def test_chat_template_matches_meta_and_masks_the_prompt(tok: TiktokenTokenizer):
    """The golden user/assistant/user prompt up to the first <|eot_id|> after the answer is one
    training example: labels only on the answer and its <|eot_id|>."""
    golden = GOLDEN["chat_dialog_prompts"][2]
    record = {"instruction": golden["messages"][0]["content"], "input": "", "output": golden["messages"][1]["content"]}
    example, truncated = data.tokenize(record, tok, "chat", max_seq_len=256)
    n_prompt = golden["ids"].index(tok.eot_id) + 1 + len(ASSISTANT_HEADER)
    n_example = golden["ids"].index(tok.eot_id, n_prompt) + 1
    assert not truncated and example.input_ids == golden["ids"][:n_example]
    assert example.labels == [IGNORE_INDEX] * n_prompt + golden["ids"][n_prompt:n_example]


def test_chat_template_on_real_records(tok: TiktokenTokenizer):
    """Prompt = what Llama.chat_tokens feeds at inference; the labelled ids decode to the output + <|eot_id|>."""
    records = data.load_records(REPO / "datasets" / "alpaca_en_demo.json")
    for record in [r for r in records if r["input"]][:6] + [r for r in records if not r["input"]][:6]:
        example, _ = data.tokenize(record, tok, "chat", max_seq_len=4096)
        user = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
        prompt = Llama.chat_tokens(SimpleNamespace(tokenizer=tok), [{"role": "user", "content": user}])
        n_prompt = example.labels.count(IGNORE_INDEX)
        assert n_prompt == len(prompt) and example.input_ids[:n_prompt] == prompt
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        assert tok.decode(example.labels[n_prompt:]) == record["output"] + "<|eot_id|>"
