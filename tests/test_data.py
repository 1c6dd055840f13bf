"""llama/tuning/data.py on the bundled alpaca demo sets (English and Chinese) with the real Llama 2 tokenizer.

References are independent of the module: the templates are written out here from Stanford Alpaca's
train.py, ids come from SentencePiece directly, and label tokens must decode back to the record's
output text. BPE boundary: prompt and response are encoded separately and concatenated (so the mask
boundary is exact by construction); the tests assert exactly that layout.
"""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from sentencepiece import SentencePieceProcessor

from llama.errors import UserError
from llama.generation import Llama
from llama.tokenizer import Tokenizer, load_tokenizer
from llama.tuning import data
from llama.tuning.data import IGNORE_INDEX

REPO = Path(__file__).resolve().parent.parent
LLAMA2 = REPO / "tests/data/tokenizers/llama2/tokenizer.model"
DATASETS = {"en": REPO / "datasets/alpaca_en_demo.json", "zh": REPO / "datasets/alpaca_zh_demo.json"}
HEAD = "Below is an instruction that describes a task"
WITH_INPUT = HEAD + ", paired with an input that provides further context. Write a response that appropriately completes the request.\n\n"
NO_INPUT = HEAD + ". Write a response that appropriately completes the request.\n\n"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(LLAMA2)


@pytest.fixture(scope="module")
def sp() -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(LLAMA2))


def expected_prompt(record: dict[str, str], template: str) -> str:
    """Reference prompt texts, written out independently of llama/tuning/data.py."""
    ins, inp = record["instruction"], record["input"]
    if template == "alpaca":
        if inp:
            return f"{WITH_INPUT}### Instruction:\n{ins}\n\n### Input:\n{inp}\n\n### Response:"
        return f"{NO_INPUT}### Instruction:\n{ins}\n\n### Response:"
    if template == "plain":
        return f"{ins}\n{inp}" if inp else ins
    return "[INST] " + (f"{ins}\n\n{inp}" if inp else ins).strip() + " [/INST]"


def some_records(lang: str) -> list[dict[str, str]]:
    """The first 12 records with an input and the first 12 without."""
    records = data.load_records(DATASETS[lang])
    return [r for r in records if r["input"]][:12] + [r for r in records if not r["input"]][:12]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_bundled_datasets_load() -> None:
    """The demo sets are the verbatim LLaMA-Factory files (999 and 1000 records, as the licence note says)."""
    en, zh = data.load_records(DATASETS["en"]), data.load_records(DATASETS["zh"])
    assert (len(en), len(zh)) == (999, 1000)
    assert sum(not r["input"] for r in en) == 587 and sum(not r["input"] for r in zh) == 861
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh[0]["instruction"] + zh[0]["output"])


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("template", data.TEMPLATES)
def test_masking_on_real_examples(lang: str, template: str, tokenizer: Tokenizer, sp: SentencePieceProcessor) -> None:
    """Labels: -100 exactly on BOS + prompt, equal to the ids on response + EOS, which decode to the output.
    With a Llama 2 tokenizer, "chat" is the llama2-chat layout (the family's own format)."""
    for record in some_records(lang):
        example, truncated = data.tokenize(record, tokenizer, template, max_seq_len=4096)
        want = record["output"].strip() if template in ("llama2-chat", "chat") else record["output"]
        prompt_ids, response_ids = sp.encode(expected_prompt(record, template)), sp.encode(want)
        assert not truncated
        assert example.input_ids == [sp.bos_id()] + prompt_ids + response_ids + [sp.eos_id()]
        assert example.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + response_ids + [sp.eos_id()]
        labelled = [t for t in example.labels if t != IGNORE_INDEX]
        assert labelled[-1] == sp.eos_id()
        assert sp.decode(labelled[:-1]) == want.lstrip(" ")  # SentencePiece drops only the dummy-prefix space
        assert sp.decode(prompt_ids) == expected_prompt(record, template)


def test_chat_prompt_matches_generation(tokenizer: Tokenizer) -> None:
    """llama2-chat trains on exactly the ids Llama.chat_tokens feeds at inference for one user turn."""
    for record in some_records("en")[::4] + some_records("zh")[::4]:
        example, _ = data.tokenize(record, tokenizer, "llama2-chat", 4096)
        n_prompt = example.labels.count(IGNORE_INDEX)
        user = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
        dialog = [{"role": "user", "content": user}]
        assert example.input_ids[:n_prompt] == Llama.chat_tokens(SimpleNamespace(tokenizer=tokenizer), dialog)


def test_train_on_inputs_and_collate(tokenizer: Tokenizer) -> None:
    """train_on_inputs labels every token; collate pads on the right with pad_id and IGNORE_INDEX only."""
    records = some_records("en")[:3] + some_records("zh")[:3]
    for record in records:
        masked, _ = data.tokenize(record, tokenizer, "alpaca", 4096)
        full, _ = data.tokenize(record, tokenizer, "alpaca", 4096, train_on_inputs=True)
        assert full.input_ids == masked.input_ids and full.labels == full.input_ids
    examples = [data.tokenize(r, tokenizer, "alpaca", 4096)[0] for r in records]
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    input_ids, labels = data.collate(examples, pad_id)
    width = max(len(e.input_ids) for e in examples)
    assert input_ids.shape == labels.shape == (len(examples), width)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert input_ids[row, :n].tolist() == example.input_ids and labels[row, :n].tolist() == example.labels
        assert (input_ids[row, n:] == pad_id).all() and (labels[row, n:] == IGNORE_INDEX).all()


@pytest.mark.slow
def test_truncation_and_dropping_counts(tokenizer: Tokenizer, sp: SentencePieceProcessor) -> None:
    """Counts match an independent tally: dropped iff BOS + prompt fills max_seq_len, truncated iff longer."""
    max_seq_len = 160
    records = data.load_records(DATASETS["en"])
    n_prompt = [1 + len(sp.encode(expected_prompt(r, "alpaca"))) for r in records]
    n_total = [p + len(sp.encode(r["output"])) + 1 for p, r in zip(n_prompt, records)]
    dropped = sum(p >= max_seq_len for p in n_prompt)
    truncated = sum(t > max_seq_len and p < max_seq_len for p, t in zip(n_prompt, n_total))
    splits = data.build_splits(DATASETS["en"], tokenizer, max_seq_len=max_seq_len, val_fraction=0.1)
    assert dropped > 0 and truncated > 0
    assert (splits.n_dropped, splits.n_truncated) == (dropped, truncated)
    kept = splits.train + splits.val
    assert len(kept) == len(records) - dropped
    assert all(len(e.input_ids) <= max_seq_len for e in kept)
    assert sum(len(e.input_ids) == max_seq_len and e.input_ids[-1] != sp.eos_id() for e in kept) == truncated
    assert str(truncated) in splits.summary() and str(dropped) in splits.summary()


def test_dropped_exactly_when_no_label_is_left(tokenizer: Tokenizer) -> None:
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    example, _ = data.tokenize(record, tokenizer, "alpaca", 4096)
    n_prompt = example.labels.count(IGNORE_INDEX)
    assert data.tokenize(record, tokenizer, "alpaca", n_prompt) == (None, True)
    kept, truncated = data.tokenize(record, tokenizer, "alpaca", n_prompt + 1)
    assert truncated and kept.labels == [IGNORE_INDEX] * n_prompt + [example.labels[n_prompt]]


def test_split_is_deterministic(tokenizer: Tokenizer) -> None:
    a = data.build_splits(DATASETS["zh"], tokenizer, max_seq_len=128, seed=3, max_examples=200)
    b = data.build_splits(DATASETS["zh"], tokenizer, max_seq_len=128, seed=3, max_examples=200)
    c = data.build_splits(DATASETS["zh"], tokenizer, max_seq_len=128, seed=4, max_examples=200)
    assert a == b and len(a.train) + len(a.val) + a.n_dropped == 200 and len(a.val) == 10
    assert a.val != c.val
    longer = data.build_splits(DATASETS["zh"], tokenizer, max_seq_len=256, seed=3, max_examples=200)
    assert [e.input_ids[:128] for e in longer.val] == [e.input_ids for e in a.val]  # split is made before tokenizing


def test_batches_shuffle_deterministically() -> None:
    lengths = list(range(100))
    epoch0 = data.batch_indices(lengths, 8, seed=1, epoch=0)
    assert epoch0 == data.batch_indices(lengths, 8, seed=1, epoch=0)
    assert epoch0 != data.batch_indices(lengths, 8, seed=1, epoch=1) and epoch0 != data.batch_indices(lengths, 8, seed=2, epoch=0)
    flat = [i for batch in epoch0 for i in batch]
    assert len(epoch0) == 12 and all(len(b) == 8 for b in epoch0) and len(set(flat)) == 96
    assert flat != sorted(flat)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_dp_ranks_disjoint_and_equal(group_by_length: bool) -> None:
    """dp ranks split each global batch: disjoint, equal counts, together exactly the dp_size=1 batches."""
    lengths = [random.Random(i).randint(1, 300) for i in range(203)]
    per_rank = [data.batch_indices(lengths, 4, seed=7, epoch=2, dp_rank=rank, dp_size=3, group_by_length=group_by_length) for rank in range(3)]
    whole = data.batch_indices(lengths, 12, seed=7, epoch=2, dp_rank=0, dp_size=1, group_by_length=group_by_length)
    assert [len(b) for b in per_rank] == [203 // 12] * 3 and all(len(batch) == 4 for b in per_rank for batch in b)
    seen = [set(i for batch in b for i in batch) for b in per_rank]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert [sum(step, []) for step in zip(*per_rank)] == whole


def test_group_by_length_puts_similar_lengths_together() -> None:
    lengths = [random.Random(i).randint(1, 500) for i in range(1000)]

    def mean_spread(batches: list[list[int]]) -> float:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    grouped = data.batch_indices(lengths, 8, seed=0, epoch=0, group_by_length=True)
    plain = data.batch_indices(lengths, 8, seed=0, epoch=0)
    assert mean_spread(grouped) < mean_spread(plain) / 10  # measured: about 10 vs 385
    assert len({i for b in grouped for i in b}) == 1000 // 8 * 8
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)  # batch order is shuffled


def test_jsonl_and_field_map(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """JSONL is detected by content; mapped names; a missing or null input means no input."""
    rows = [{"prompt": "Say hi.", "completion": "Hi!"}, {"prompt": "Add 2 and 3.", "context": None, "completion": "5"}]
    path = write(tmp_path / "data.json", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    field_map = data.parse_field_map("instruction=prompt, output=completion,input=context")
    records = data.load_records(path, field_map)
    assert records == [{"instruction": "Say hi.", "input": "", "output": "Hi!"}, {"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    assert data.build_splits(path, tokenizer, field_map=field_map, val_fraction=0).train != []


BAD = {
    "missing": (None, "not found"),
    "empty": ("", "is empty"),
    "blank": ("  \n\n", "is empty"),
    "no records": ("[]", "holds no records"),
    "list, bad JSON": ('[\n{"instruction": "a", "output": "b"},\n{"instruction": "a" "output": "b"}\n]', "line 3"),
    "jsonl, bad line": ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n', "line 3"),
    "list, no output": ('[{"instruction": "a", "output": "b"}, {"instruction": "a", "response": "b"}]', "record 1 .*'output'"),
    "jsonl, no instruction": ('{"instruction": "a", "output": "b"}\n{"output": "b"}\n', "line 2 has no 'instruction'"),
    "not a string": ('[{"instruction": "a", "output": 3}]', "'output' is a int, not a string"),
    "not an object": ('["a"]', "record 0 .* is a str"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_datasets_give_one_clear_line(case: str, tmp_path: Path) -> None:
    text, message = BAD[case]
    path = tmp_path / "data.json" if text is None else write(tmp_path / "data.json", text)
    with pytest.raises(UserError, match=message) as err:
        data.load_records(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_bad_settings_give_one_clear_line(tmp_path: Path, tokenizer: Tokenizer) -> None:
    record = {"instruction": "a", "input": "", "output": "b"}
    with pytest.raises(UserError, match="unknown template 'vicuna': choose one of alpaca, chat, llama2-chat, plain"):
        data.render(record, "vicuna")
    with pytest.raises(UserError, match="unknown template"):
        data.build_splits(DATASETS["en"], tokenizer, template="chatml")
    with pytest.raises(UserError, match="every training example is longer than max_seq_len 16.*raise --max_seq_len"):
        data.build_splits(DATASETS["en"], tokenizer, max_seq_len=16, max_examples=50)
    with pytest.raises(UserError, match="not ours"):
        data.load_records(DATASETS["en"], {"question": "instruction"})
    with pytest.raises(UserError, match="OURS=THEIRS"):
        data.parse_field_map("instruction")
    with pytest.raises(UserError, match="cannot fill one batch"):
        data.batch_indices([5] * 10, 4, seed=0, epoch=0, dp_size=3)
    with pytest.raises(UserError, match="1 record leaves none for training"):
        data.build_splits(write(tmp_path / "one.json", json.dumps([record])), tokenizer)
