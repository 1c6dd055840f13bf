"""Hugging Face tokenizer files for an HF export: tokenizer.json, tokenizer_config.json and
special_tokens_map.json, so that `AutoTokenizer.from_pretrained(<export>)` (and lm-eval's `hf`
model, vLLM, TGI) tokenize as this project does, with no sentencepiece/protobuf and no download.

tokenizer.json is built with HF's own `tokenizers` library, as transformers' converters build it:
- SentencePiece (Llama 1/2, `LlamaConverter` in its legacy mode, which is SentencePiece's own
  behaviour): a BPE model with byte fallback over the pieces, merges rebuilt from the pieces'
  scores, a normalizer that prepends "▁" and turns spaces into "▁" (and, for a model trained with
  remove_extra_whitespaces such as llama2.c's tok512, first drops leading/trailing spaces and
  collapses runs of them), BOS added by the post-processor.
- tiktoken (Llama 3, `TikTokenConverter`): a byte-level BPE whose merges are rebuilt from the
  ranks (`byte_level_merges`, the rebuild the GGUF export uses too), Meta's split pattern, the 256 special
  tokens, BOS added by the post-processor.
Special tokens are matched in text by HF's tokenizer (its usual behaviour), which is what chat
templates rely on; this project's own `encode` keeps special-token text as text.

`tokenizers` is the optional extra "hf" (`pip install -e ".[hf]"`): it is a compiled wheel that
pulls in huggingface-hub and its dependencies (httpx, pyyaml, fsspec, hf-xet, ...), which
inference, conversion and serving never need. Without it an HF export is written as before,
with only tokenizer.model, and says so.
"""

import hashlib
import importlib.util
from pathlib import Path
from typing import Callable, Optional

from tiktoken.load import load_tiktoken_bpe

from llama.chat import CHAT_TEMPLATES
from llama.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer, special_tokens

TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
SPACE = "▁"  # SentencePiece's U+2581


def have_tokenizers() -> bool:
    return importlib.util.find_spec("tokenizers") is not None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 `encoder.py`), the alphabet of
    byte-level BPE vocabularies: printable Latin-1 bytes stand for themselves, the rest map to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_level_merges(ranks: dict[bytes, int], as_text) -> list[str]:
    """The merge list a BPE engine needs to reproduce tiktoken's ranks, as transformers' TikTokenConverter
    (which made the Hub's Llama 3 tokenizer.json) and llama.cpp's Tekken vocab reconstruct it: for each
    token in rank order, every split into two tokens, ordered by the ranks of the halves."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [f"{as_text(left)} {as_text(right)}" for left, right in splits]
    return merges


def byte_level_ranks(path: Path) -> tuple[dict[bytes, int], Callable[[bytes], str]]:
    """Meta's tiktoken ranks, and a token's spelling in GPT-2's byte-to-unicode alphabet, the form
    byte-level BPE vocabularies use (HF's tokenizer.json, llama.cpp's gpt2 vocabulary)."""
    byte_chars = bytes_to_unicode()
    ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(path.read_bytes()).hexdigest())
    return ranks, lambda token: "".join(byte_chars[b] for b in token)


def sentencepiece_json(tok: SentencePieceTokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes as the SentencePiece BPE model does."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    normal = [i for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    by_score = sorted(normal, key=lambda i: -sp.get_score(i))  # SentencePiece merges the best-scoring piece first
    ranks = {sp.id_to_piece(i): rank for rank, i in enumerate(by_score)}
    merges = [tuple(m.split(" ")) for m in byte_level_merges(ranks, lambda piece: piece)]
    model = BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True, byte_fallback=True)
    hf = Tokenizer(model)
    steps = []
    if sp.encode(" a  b ") == sp.encode("a b"):  # trained with remove_extra_whitespaces (llama2.c's tok512)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return hf


def tiktoken_json(tok: TiktokenTokenizer, path: Path):
    """A `tokenizers.Tokenizer` for Meta's Llama 3 ranks: byte-level BPE with Meta's split pattern."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from llama.tokenizer import LLAMA3_PATTERN

    ranks, as_text = byte_level_ranks(path)
    merges = [tuple(m.split(" ")) for m in byte_level_merges(ranks, as_text)]
    hf = Tokenizer(BPE(vocab={as_text(t): r for t, r in ranks.items()}, merges=merges, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


def build(tok: Tokenizer, path: Path):
    """tokenizer.json's `tokenizers.Tokenizer`: the model, its special tokens, BOS added as `encode(bos=True)` does."""
    from tokenizers import AddedToken, processors

    hf = tiktoken_json(tok, path) if isinstance(tok, TiktokenTokenizer) else sentencepiece_json(tok)
    specials = sorted(special_tokens(tok).items(), key=lambda item: item[1])
    hf.add_special_tokens([AddedToken(text, special=True, normalized=False) for text, _ in specials])
    bos = next(text for text, i in specials if i == tok.bos_id)
    hf.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    return hf


def tokenizer_files(tokenizer_path: Path, model_max_length: int) -> Optional[dict[str, str]]:
    """File name -> text of the three HF tokenizer files for `tokenizer_path`; None without `tokenizers`."""
    import json

    if not have_tokenizers():
        return None
    tok = load_tokenizer(tokenizer_path)
    names = {i: text for text, i in special_tokens(tok).items()}
    special = {"bos_token": names[tok.bos_id], "eos_token": names[tok.eos_id]}
    if isinstance(tok, SentencePieceTokenizer):
        special["unk_token"] = names[tok.sp.unk_id()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written, in every transformers version
        **special,
        "pad_token": names.get(tok.pad_id),
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATES[tok.family],
    }
    return {
        TOKENIZER_JSON: build(tok, tokenizer_path).to_str(pretty=True) + "\n",
        TOKENIZER_CONFIG: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        SPECIAL_TOKENS_MAP: json.dumps(special, indent=2, ensure_ascii=False) + "\n",
    }
