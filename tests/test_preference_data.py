"""llama/tuning/preference.py: preference records -> (prompt, chosen, rejected) ids -> one batch of 2B rows.

References are independent of the module where they can be: Llama 2 ids come from SentencePiece
directly, the alpaca prompt is written out from Stanford Alpaca's train.py and Llama 2's chat format
from Meta's reference code ([INST] ... [/INST], <<SYS>> in the first turn, BOS/EOS around each
finished turn). Where the module is specified as reusing the SFT pipeline (a text prompt is
tokenized as the SFT record {instruction: prompt, input: "", output: response}), the test says so
by comparing with llama/tuning/data.py.
"""

import json
import sys
from pathlib import Path

import pytest
from sentencepiece import SentencePieceProcessor

from llama import chat
from llama.errors import UserError
from llama.tokenizer import Tokenizer, load_tokenizer
from llama.tuning import data, preference
from llama.tuning.data import IGNORE_INDEX
from llama.tuning.preference import Pair

REPO = Path(__file__).resolve().parent.parent
LLAMA2 = REPO / "tests/data/tokenizers/llama2/tokenizer.model"
LLAMA3 = REPO / "tests/data/tokenizers/llama3/tokenizer.model"
MESSAGES = REPO / "tests/data/ultrafeedback_sample.jsonl"
DEMOS = {"en": REPO / "datasets/dpo_en_demo.jsonl", "zh": REPO / "datasets/dpo_zh_demo.jsonl"}
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:")


@pytest.fixture(scope="module")
def llama2() -> Tokenizer:
    return load_tokenizer(LLAMA2)


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return load_tokenizer(LLAMA3)


@pytest.fixture(scope="module")
def sp() -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(LLAMA2))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def demo_rows(lang: str, n: int = 12) -> list[dict]:
    return [json.loads(line) for line in DEMOS[lang].read_text(encoding="utf-8").splitlines()[:n]]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_explicit_prompt_alpaca_from_sentencepiece(lang: str, llama2: Tokenizer, sp: SentencePieceProcessor, tmp_path: Path) -> None:
    """BOS + Alpaca's no-input prompt, then each response + EOS, ids straight from SentencePiece."""
    rows = demo_rows(lang)
    pairs = preference.load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), llama2, template="alpaca", max_seq_len=4096)
    assert (len(pairs.pairs), pairs.n_truncated, pairs.n_dropped) == (len(rows), 0, 0)
    assert pairs.summary() == (f"data: {len(rows)} preference pairs, 0 with a response truncated to max_seq_len, "
                               f"0 dropped (no room for a response, or no difference left)")
    for row, pair in zip(rows, pairs.pairs):
        assert pair.prompt == [sp.bos_id()] + sp.encode(ALPACA_NO_INPUT.format(instruction=row["prompt"]))
        assert pair.chosen == sp.encode(row["chosen"]) + [sp.eos_id()]
        assert pair.rejected == sp.encode(row["rejected"]) + [sp.eos_id()]


@pytest.mark.slow
@pytest.mark.parametrize("template", data.TEMPLATES)
@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_explicit_prompt_is_tokenized_as_sft(template: str, family: str, llama2: Tokenizer, llama3: Tokenizer, tmp_path: Path) -> None:
    """Every template, both families: the ids of the SFT record {instruction: prompt, input: "", output: response}."""
    tokenizer = llama2 if family == "llama2" else llama3
    rows = demo_rows("en", 4) + demo_rows("zh", 4)
    pairs = preference.load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, template=template, max_seq_len=4096).pairs
    for row, pair in zip(rows, pairs):
        for response, ids in ((row["chosen"], pair.chosen), (row["rejected"], pair.rejected)):
            assert (pair.prompt, ids) == data.encode({"instruction": row["prompt"], "input": "", "output": response}, tokenizer, template)
        end = tokenizer.eot_id if family == "llama3" and template == "chat" else tokenizer.eos_id
        assert pair.chosen[-1] == pair.rejected[-1] == end and pair.prompt[0] == tokenizer.bos_id


def meta_llama2_prompt(sp: SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Meta's Llama 2 chat format, written out: system inside the first user turn, <s>[INST] u [/INST] a </s> per finished turn."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}"}] + dialog[2:]
    ids = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        ids += [sp.bos_id()] + sp.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ") + [sp.eos_id()]
    return ids + [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")


def test_message_lists_llama2(llama2: Tokenizer, sp: SentencePieceProcessor) -> None:
    """UltraFeedback style: the shared turns in Meta's format, each final answer + EOS; a prompt list goes in front."""
    rows = [json.loads(line) for line in MESSAGES.read_text().splitlines()]
    pairs = preference.load_pairs(MESSAGES, llama2, template="chat", max_seq_len=4096).pairs
    assert len(pairs) == len(rows) == 3
    for row, pair in zip(rows, pairs):
        prefix = row["prompt"] if isinstance(row["prompt"] if "prompt" in row else None, list) else []
        assert pair.prompt == meta_llama2_prompt(sp, prefix + row["chosen"][:-1])
        assert pair.chosen == sp.encode(row["chosen"][-1]["content"].strip()) + [sp.eos_id()]
        assert pair.rejected == sp.encode(row["rejected"][-1]["content"].strip()) + [sp.eos_id()]


def test_message_lists_llama3(llama3: Tokenizer) -> None:
    """Llama 3: the prompt is chat.dialog_tokens (ending with the assistant header), each answer its content + <|eot_id|>."""
    rows = [json.loads(line) for line in MESSAGES.read_text().splitlines()]
    pairs = preference.load_pairs(MESSAGES, llama3, template="chat", max_seq_len=4096).pairs
    header = chat.llama3_header(llama3, "assistant")
    for row, pair in zip(rows, pairs):
        prefix = row["prompt"] if isinstance(row.get("prompt"), list) else []
        assert pair.prompt == chat.dialog_tokens(llama3, prefix + row["chosen"][:-1])
        assert pair.prompt[-len(header):] == header and pair.prompt[0] == llama3.bos_id
        for ids, dialog in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            assert ids[-1] == llama3.eot_id and llama3.decode(ids[:-1]) == dialog[-1]["content"]


def test_collate_pairs_chosen_rows_then_rejected_rows(llama2: Tokenizer) -> None:
    """Rows 0..B-1: prompt + chosen; rows B..2B-1: prompt + rejected; labels only on responses; right padding."""
    pairs = preference.load_pairs(DEMOS["en"], llama2, template="alpaca", max_seq_len=4096, max_examples=3).pairs
    input_ids, labels = preference.collate_pairs(pairs, pad_id=0)
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    assert input_ids.shape == labels.shape == (6, max(len(a) + len(b) for a, b in rows))
    for row, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        assert input_ids[row, :n].tolist() == prompt + response and (input_ids[row, n:] == 0).all()
        assert labels[row, : len(prompt)].eq(IGNORE_INDEX).all() and labels[row, len(prompt) : n].tolist() == response
        assert labels[row, n:].eq(IGNORE_INDEX).all() and labels[row, n - 1] == llama2.eos_id


@pytest.mark.slow
def test_over_long_pairs_keep_the_prompt_and_are_counted(llama2: Tokenizer, sp: SentencePieceProcessor) -> None:
    """Prompt kept whole, responses cut to max_seq_len - prompt; dropped iff the prompt leaves no room; tallied independently."""
    max_seq_len = 120
    rows = [json.loads(line) for line in DEMOS["en"].read_text().splitlines()]
    n_prompt = [1 + len(sp.encode(ALPACA_NO_INPUT.format(instruction=r["prompt"]))) for r in rows]
    n_resp = [(len(sp.encode(r["chosen"])) + 1, len(sp.encode(r["rejected"])) + 1) for r in rows]
    dropped = sum(p >= max_seq_len for p in n_prompt)
    truncated = sum(p < max_seq_len and p + max(c, r) > max_seq_len for p, (c, r) in zip(n_prompt, n_resp))
    pairs = preference.load_pairs(DEMOS["en"], llama2, template="alpaca", max_seq_len=max_seq_len)
    assert dropped > 0 and truncated > 0
    assert (pairs.n_dropped, pairs.n_truncated, len(pairs.pairs)) == (dropped, truncated, len(rows) - dropped)
    kept = [(r, p) for r, p in zip(rows, n_prompt) if p < max_seq_len]
    for (row, prompt_len), pair in zip(kept, pairs.pairs):
        assert len(pair.prompt) == prompt_len  # never cut
        room = max_seq_len - prompt_len
        assert pair.chosen == (sp.encode(row["chosen"]) + [sp.eos_id()])[:room]
        assert pair.rejected == (sp.encode(row["rejected"]) + [sp.eos_id()])[:room]


def test_fit_pair_edges() -> None:
    """No room for one response token -> dropped; responses cut to the same tokens -> dropped (nothing to prefer)."""
    assert preference.fit_pair([1, 2, 3], [4, 5], [6], 3) == (None, True)
    assert preference.fit_pair([1, 2], [4, 5, 6], [4, 5, 7], 4) == (None, True)  # both become [4, 5]
    assert preference.fit_pair([1, 2], [4, 5, 6], [4, 7], 4) == (Pair([1, 2], [4, 5], [4, 7]), True)
    assert preference.fit_pair([1], [4], [5, 6], 3) == (Pair([1], [4], [5, 6]), False)


def test_field_map_and_json_list(llama2: Tokenizer, tmp_path: Path) -> None:
    rows = [{"question": "Say hi.", "good": "Hi!", "bad": "Bye."}, {"question": "Add 2 and 3.", "good": "5", "bad": "23"}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows, indent=1))
    field_map = data.parse_field_map("prompt=question,chosen=good,rejected=bad")
    records = preference.load_records(path, field_map)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [("Say hi.", "Hi!", "Bye."), ("Add 2 and 3.", "5", "23")]
    assert records[1].where == "record 1 (0-based)"
    with pytest.raises(UserError, match="not preference fields; map only prompt, chosen, rejected"):
        preference.load_records(path, {"instruction": "question"})


HH = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
USER = {"role": "user", "content": "Hi?"}
BAD = {
    "not an object": (["a string"], "line 1 is a str, not an object"),
    "missing rejected": ([HH, {"prompt": "a", "chosen": "b"}], "line 2 has no 'rejected' field .*add them"),
    "not a string": ([HH, HH, {"prompt": "a", "chosen": "b", "rejected": 3}], "line 3 field 'rejected' is a int, not a string"),
    "chosen == rejected": ([{"prompt": "a", "chosen": "same", "rejected": "same"}], "line 1: 'chosen' and 'rejected' are the same"),
    "empty response": ([HH, {"prompt": "a", "chosen": "  ", "rejected": "b"}], "line 2 has an empty 'chosen' response"),
    "turns differ": ([{"chosen": [USER, {"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "b"}]}],
                     "line 1: 'chosen' and 'rejected' do not share their leading turns"),
    "no final answer": ([{"chosen": [USER, {"role": "assistant", "content": "a"}], "rejected": [USER]}],
                        "line 1 field 'rejected' does not end with an assistant message"),
    "bad message": ([{"chosen": [USER, {"role": "bot", "content": "a"}], "rejected": [USER, {"role": "assistant", "content": "b"}]}],
                    "line 1 field 'chosen': message 1 must be"),
    "no prompt turns": ([{"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}],
                        "line 1 has no prompt"),
    "messages, same answer": ([{"chosen": [USER, {"role": "assistant", "content": "a"}], "rejected": [USER, {"role": "assistant", "content": "a"}]}],
                              "line 1: 'chosen' and 'rejected' are the same"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_records_name_file_line_and_fix(case: str, tmp_path: Path, llama2: Tokenizer) -> None:
    rows, message = BAD[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserError, match=message) as err:
        preference.load_pairs(path, llama2, template="chat", max_seq_len=256)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


def test_bad_record_in_a_json_list_names_its_index(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([HH, HH, {"prompt": "a", "chosen": "b", "rejected": ""}]))
    with pytest.raises(UserError, match=r"record 2 \(0-based\) has an empty 'rejected' response"):
        preference.load_records(path)


def test_sft_data_is_refused_naming_the_missing_fields(llama2: Tokenizer) -> None:
    with pytest.raises(UserError) as err:
        preference.build_pair_splits(REPO / "datasets/alpaca_en_demo.json", llama2)
    message = str(err.value)
    assert "record 0 (0-based) has no 'prompt', 'chosen', 'rejected' fields" in message
    assert "looks like SFT data ('instruction', 'output')" in message and "field map" in message


def test_message_lists_need_the_chat_template(llama2: Tokenizer) -> None:
    with pytest.raises(UserError, match="line 1 holds chat messages.*pass --template chat"):
        preference.load_pairs(MESSAGES, llama2, template="alpaca", max_seq_len=256)


def test_llama2_dialog_order_error_names_the_record(llama2: Tokenizer, tmp_path: Path) -> None:
    rows = [{"chosen": [USER, USER, {"role": "assistant", "content": "a"}], "rejected": [USER, USER, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(UserError, match="line 1: a dialog must be .*alternating"):
        preference.load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), llama2, template="chat", max_seq_len=256)


@pytest.mark.slow
def test_split_is_deterministic_and_val_data_replaces_it(llama2: Tokenizer) -> None:
    a = preference.build_pair_splits(DEMOS["en"], llama2, template="plain", max_seq_len=128, val_fraction=0.1, seed=3, max_examples=200)
    b = preference.build_pair_splits(DEMOS["en"], llama2, template="plain", max_seq_len=128, val_fraction=0.1, seed=3, max_examples=200)
    c = preference.build_pair_splits(DEMOS["en"], llama2, template="plain", max_seq_len=128, val_fraction=0.1, seed=4, max_examples=200)
    assert a == b and a.val != c.val and (len(a.train), len(a.val)) == (179, 20)  # 200 pairs, one with no room left at 128 tokens
    assert "1 dropped" in a.summary()
    held_out = preference.build_pair_splits(DEMOS["en"], llama2, template="plain", max_seq_len=4096, val_fraction=0.1, seed=3, val_path=DEMOS["zh"])
    assert len(held_out.train) == 499 and held_out.val == preference.load_pairs(DEMOS["zh"], llama2, template="plain", max_seq_len=4096).pairs
    assert "499 train / 500 val preference pairs" in held_out.summary()


def test_data_parallel_batches_are_disjoint_and_resumable() -> None:
    pairs = [Pair([1] * (1 + i % 7), [2, 3], [4]) for i in range(50)]
    ranks = [preference.PairBatches(pairs, 4, seed=1, dp_rank=r, dp_size=2, pad_id=0) for r in range(2)]
    first = [[r.batches[k] for r in ranks] for k in range(len(ranks[0].batches))]
    assert all(not set(a) & set(b) and len(a) == len(b) == 4 for a, b in first)
    source = preference.PairBatches(pairs, 4, seed=1, dp_rank=0, dp_size=2, pad_id=0)
    for _ in range(9):  # into the second epoch (6 batches of 4 x 2 per epoch)
        source.next()
    assert source.state() == {"epoch": 1, "position": 3}
    resumed = preference.PairBatches(pairs, 4, seed=1, dp_rank=0, dp_size=2, pad_id=0, **source.state())
    for _ in range(5):
        (ids_a, labels_a, index_a), n_a = source.next()
        (ids_b, labels_b, index_b), n_b = resumed.next()
        assert ids_a.equal(ids_b) and labels_a.equal(labels_b) and n_a == n_b and ids_a.size(0) == 8
        assert index_a.equal(index_b)
        for row, i in enumerate(index_a.tolist()):  # row r holds pair index[r]: its prompt, then its chosen response
            n = len(pairs[i].prompt)
            assert ids_a[row, :n].eq(1).all() and ids_a[row, n : n + 2].tolist() == [2, 3]
    batches = preference.PairBatches(pairs, 4, seed=1, dp_rank=0, dp_size=2, pad_id=0)
    assert batches.order(epoch=0) != batches.order(epoch=1)


def test_eval_batches_cover_every_pair_once() -> None:
    pairs = [Pair([1], [2 + i], [3]) for i in range(11)]
    seen = []
    for rank in range(3):
        for input_ids, _, indices in preference.eval_pair_batches(pairs, 2, dp_rank=rank, dp_size=3, pad_id=0):
            half = input_ids.size(0) // 2
            seen += input_ids[:half, 1].tolist()
            assert input_ids[:half, 1].tolist() == [2 + i for i in indices.tolist()], "each row's pair index"
    assert sorted(seen) == [2 + i for i in range(11)]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_demo_sets_are_what_the_script_builds(lang: str) -> None:
    """datasets/dpo_*_demo.jsonl: the script's output byte for byte; chosen = the prompt's own output, rejected =
    an answer to another instruction; every alpaca output in one pair at most (a held-out pair must not hold
    training responses with their preference reversed)."""
    import collections

    sys.path.insert(0, str(REPO / "datasets"))
    try:
        import make_preferences
    finally:
        sys.path.pop(0)
    built = make_preferences.build(make_preferences.SOURCES[lang])
    assert DEMOS[lang].read_text(encoding="utf-8") == "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in built)
    alpaca = [r for r in json.loads(make_preferences.SOURCES[lang].read_text(encoding="utf-8")) if r["output"].strip()]
    instructions_of = collections.defaultdict(set)
    for record in alpaca:
        instructions_of[record["output"]].add(record["instruction"])
    for pair in built:
        own = [i for i in instructions_of[pair["chosen"]] if pair["prompt"].startswith(i)]
        assert own and not any(pair["prompt"].startswith(i) for i in instructions_of[pair["rejected"]])
    used = collections.Counter(p["chosen"] for p in built) + collections.Counter(p["rejected"] for p in built)
    available = collections.Counter(r["output"] for r in alpaca)
    assert all(used[o] <= available[o] for o in used) and len(built) >= len(alpaca) // 2 - 2
