"""llama/tokenizer.py against ids, pieces and decodes recorded with sentencepiece 0.2.3
(tests/data/tokenizer_cases.json): Meta's Llama 2 tokenizer and the bundled tok512."""

import hashlib
import json

import pytest
import sentencepiece
from references import DATA, LLAMA2_TOKENIZER, STORIES, STORIES_TOKENIZER

from llama.errors import UserError
from llama.tokenizer import load_tokenizer

CASES = json.loads((DATA / "tokenizer_cases.json").read_text())["tokenizers"]
FILES = {"llama2": LLAMA2_TOKENIZER, "tok512": STORIES_TOKENIZER}
TOKENIZERS = {name: load_tokenizer(path) for name, path in FILES.items()}


@pytest.mark.parametrize("name", FILES)
def test_files_and_special_ids(name: str):
    """The files are the ones the cases were made from; special ids are the model's own."""
    meta = CASES[name]
    assert hashlib.sha256(FILES[name].read_bytes()).hexdigest() == meta["sha256"]
    tok = TOKENIZERS[name]
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["pad_id"])


@pytest.mark.parametrize(
    "name,case",
    [(name, case) for name in FILES for case in CASES[name]["cases"]],
    ids=lambda v: v if isinstance(v, str) else v["name"],
)
def test_encode_decode(name: str, case: dict):
    tok = TOKENIZERS[name]
    assert tok.encode(case["text"], bos=False, eos=False) == case["ids"]
    assert tok.encode(case["text"], bos=True, eos=False) == case["ids_with_bos"]
    assert tok.encode(case["text"], bos=True, eos=True) == case["ids_with_bos_eos"]
    assert [tok.sp.id_to_piece(i) for i in case["ids"]] == case["pieces"]
    assert tok.decode(case["ids"]) == case["decoded"]
    assert tok.decode(case["ids_with_bos_eos"]) == case["decoded"], "BOS/EOS must decode to nothing"
    assert (tok.decode(tok.encode(case["text"], bos=False, eos=False)) == case["text"]) == case["roundtrip_exact"]


def test_special_token_text_is_not_special():
    """"<s>" typed in a prompt is text, never the BOS id (prompt injection of control tokens): the ids
    are sentencepiece's own for that text (which spells "<s>" with ordinary pieces) and decode back to it."""
    text = "<s> not a bos </s>"
    for name, tok in TOKENIZERS.items():
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == sentencepiece.SentencePieceProcessor(model_file=str(FILES[name])).encode(text)
        assert len(ids) > 6 and tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text


def test_missing_or_foreign_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(UserError, match="neither a SentencePiece model"):
        load_tokenizer(STORIES / "params.json")
