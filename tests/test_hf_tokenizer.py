"""The tokenizer files an HF export carries (llama/formats/hf_tokenizer.py), loaded by transformers'
AutoTokenizer: against SentencePiece's golden ids (tests/data/tokenizer_cases.json, Llama 2 and
llama2.c's tok512), Meta's own Llama 3 tokenizer and ChatFormat outputs
(tests/data/llama3_tokenizer_cases.json), and this project's --chat prompts; and transformers
scoring an exported stories260K as `Llama.score` does. GGUF exports carry the chat template.
"""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from references import DATA, LLAMA2_TOKENIZER, STORIES, STORIES_TOKENIZER

from llama import chat, distributed
from llama.formats.hf_tokenizer import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_JSON, tokenizer_files
from llama.generation import Llama
from llama.tokenizer import load_tokenizer

LLAMA3_TOKENIZER = DATA / "tokenizers" / "llama3" / "tokenizer.model"
SP_CASES = json.loads((DATA / "tokenizer_cases.json").read_text())["tokenizers"]
LLAMA3_CASES = json.loads((DATA / "llama3_tokenizer_cases.json").read_text())
DIALOGS = [
    [{"role": "user", "content": "Tell me a story about a dog."}],
    [{"role": "system", "content": "You are a kind storyteller."}, {"role": "user", "content": "Once upon a time?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "A  story,  please. "}],
]
# transformers' float32 logits and ours are each within 1e-4 of llama2.c's on stories260K
# (tests/test_hf.py's LLAMA2C_ATOL, references.PRECISIONS), so within 2e-4 of each other; a
# logprob (logit - logsumexp of logits) then within 4e-4.
LOGPROB_ATOL = 4e-4


def export_tokenizer(tokenizer_path: Path, folder: Path):
    """The three files in `folder`, loaded back by AutoTokenizer (no sentencepiece, no download)."""
    folder.mkdir()
    for name, text in tokenizer_files(tokenizer_path, 512).items():
        (folder / name).write_text(text)
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    paths = {"llama2": LLAMA2_TOKENIZER, "tok512": STORIES_TOKENIZER, "llama3": LLAMA3_TOKENIZER}
    return {name: export_tokenizer(path, root / name) for name, path in paths.items()}


def ids_of(encoded) -> list[int]:
    """apply_chat_template's ids, whether transformers returns a list or a BatchEncoding."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2", "tok512"])
def test_sentencepiece_export_gives_the_golden_ids_and_bos(hf_tokenizers, name):
    """Every golden string: BOS added as `encode(bos=True)` adds it, then SentencePiece's ids;
    decoding gives SentencePiece's text. Special-token text stays text as in our encode when asked
    (`split_special_tokens`); by default HF matches it, as every HF Llama tokenizer does."""
    hf = hf_tokenizers[name]
    for case in SP_CASES[name]["cases"]:
        assert hf(case["text"], split_special_tokens=True).input_ids == case["ids_with_bos"], case["name"]
        assert hf.decode(case["ids"]) == case["decoded"], case["name"]
    assert hf("<s>hi").input_ids[:2] == [1, 1]


@pytest.mark.slow
def test_llama3_export_gives_metas_ids_and_chat_prompts(hf_tokenizers):
    hf = hf_tokenizers["llama3"]
    for case in LLAMA3_CASES["cases"]:
        assert hf(case["text"], split_special_tokens=True).input_ids == case["ids_with_bos"], case["text"][:30]
        assert hf.decode(case["ids"]) == case["decoded"]
    for prompt in LLAMA3_CASES["chat_dialog_prompts"]:  # Meta's ChatFormat.encode_dialog_prompt
        assert ids_of(hf.apply_chat_template(prompt["messages"], add_generation_prompt=True)) == prompt["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("name,path", [("llama2", LLAMA2_TOKENIZER), ("tok512", STORIES_TOKENIZER), ("llama3", LLAMA3_TOKENIZER)])
def test_apply_chat_template_gives_the_chat_ids(hf_tokenizers, name, path):
    """transformers renders the exported Jinja template and tokenizes it: the ids `--chat` uses."""
    tok = load_tokenizer(path)
    for dialog in DIALOGS:
        assert ids_of(hf_tokenizers[name].apply_chat_template(dialog, add_generation_prompt=True)) == chat.dialog_tokens(tok, dialog)


@pytest.mark.slow
def test_config_names_the_special_tokens_and_template(hf_tokenizers):
    hf = hf_tokenizers["llama3"]
    assert (hf.bos_token, hf.eos_token, hf.bos_token_id, hf.eos_token_id) == ("<|begin_of_text|>", "<|end_of_text|>", 128000, 128001)
    assert hf.chat_template == chat.LLAMA3_CHAT_TEMPLATE
    hf = hf_tokenizers["llama2"]
    assert (hf.bos_token, hf.eos_token, hf.unk_token, hf.pad_token) == ("<s>", "</s>", "<unk>", None)


@pytest.fixture(scope="module")
def stories_export(tmp_path_factory) -> Path:
    from llama.formats.convert import convert

    return convert(STORIES, out_format="hf", out_dir=tmp_path_factory.mktemp("hf") / "stories260K", progress=False)


@pytest.mark.slow
def test_hf_export_loads_whole_and_scores_as_the_score_api(stories_export):
    """split_model.py --out_format hf's folder: AutoTokenizer and AutoModelForCausalLM from it alone
    give the ids and the loglikelihoods of `Llama.score`."""
    assert {TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP} <= {p.name for p in stories_export.iterdir()}
    manifest = json.loads((stories_export / "manifest.json").read_text())
    assert TOKENIZER_JSON in json.dumps(manifest)
    hf_tok = transformers.AutoTokenizer.from_pretrained(stories_export)
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_export, dtype=torch.float32).eval()
    texts = ["Once upon a time, there was a little girl named Lily.", "Tom and his dog went to the park. They played with a ball."]
    llm = Llama.build(STORIES, max_seq_len=64, max_batch_size=2)
    try:
        seqs = [llm.tokenizer.encode(t, bos=True, eos=False) for t in texts]
        assert [hf_tok(t).input_ids for t in texts] == seqs
        want = llm.score(seqs)
    finally:
        distributed.teardown()
    for seq, expected in zip(seqs, want):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].float(), dim=-1)
        got = logprobs.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got, torch.tensor(expected[1:]), rtol=0, atol=LOGPROB_ATOL)


def test_gguf_export_carries_the_chat_template(tmp_path):
    gguf = pytest.importorskip("gguf")
    from llama.formats.convert import convert

    out = convert(STORIES, out_format="gguf", out_dir=tmp_path / "gguf", progress=False)
    field = gguf.GGUFReader(str(out / "model.gguf")).get_field("tokenizer.chat_template")
    assert bytes(field.parts[field.data[0]]).decode() == chat.LLAMA2_CHAT_TEMPLATE


def test_hf_export_without_tokenizers_says_so_and_writes_the_rest(tmp_path, monkeypatch, capsys):
    """Without the `hf` extra the export is what it was before (tokenizer.model only), with a note."""
    from llama.formats.convert import convert

    monkeypatch.setattr("llama.formats.hf_tokenizer.have_tokenizers", lambda: False)
    out = convert(STORIES, out_format="hf", out_dir=tmp_path / "hf", progress=False)
    names = {p.name for p in out.iterdir()}
    assert "tokenizer.model" in names and "config.json" in names and not names & {TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP}
    assert 'pip install -e ".[hf]"' in capsys.readouterr().err
