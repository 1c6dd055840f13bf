"""Tokenizers of both Llama families behind one interface, and the factory that picks one by content.

Llama 1/2 ship a SentencePiece model; Llama 3 ships a tiktoken BPE file under the same name
(`tokenizer.model`), so `load_tokenizer` looks inside the file, never at its name. Both classes
expose `n_words`, `bos_id`, `eos_id`, `pad_id` (-1 = none), `stop_ids` (generation ends at any of
them), `encode`, `decode` and `family`, which picks the chat format (llama/chat.py).
"""

import hashlib
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Literal, Optional

import tiktoken
from sentencepiece import SentencePieceProcessor
from tiktoken.load import load_tiktoken_bpe

from llama.errors import UserError

Family = Literal["llama2", "llama3"]


class Tokenizer(ABC):
    """Text <-> token ids with the model's own special ids (never forced to 0)."""

    family: Family
    """Which chat format the model was tuned with: "llama2" ([INST]) or "llama3" (header/eot tokens)."""
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    """-1 when the model has no padding token."""
    stop_ids: frozenset[int]
    """Generation stops at any of these (Llama 2: just EOS)."""

    @abstractmethod
    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Ids of `text`, optionally wrapped in BOS/EOS. Special-token text in `text` stays plain text."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (bytes that are not whole UTF-8 characters become U+FFFD)."""

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: a text longer than n times this needs more than n tokens."""
        if getattr(self, "_max_token_chars", None) is None:
            self._max_token_chars = max(len(self.decode([i])) for i in range(self.n_words))
        return self._max_token_chars


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2: a SentencePiece model; BOS, EOS and PAD ids are read from the model file."""

    family: Family = "llama2"

    def __init__(self, model_proto: bytes, name: str = "tokenizer"):
        try:
            self.sp = SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as err:
            raise UserError(f"{name} is not a SentencePiece model ({err})") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.eos_id})

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# Meta's Llama 3 split pattern and special tokens (meta-llama/llama-models, llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
)
LLAMA3_N_SPECIALS = 256
"""The named specials, then <|reserved_special_token_2|> ... up to 256 in all, after the BPE ranks."""
MAX_ENCODE_CHARS = 400_000
"""tiktoken panics on longer strings, so Meta encodes in slices of this many characters."""
MAX_RUN_CHARS = 25_000
"""tiktoken's BPE is quadratic in a run of whitespace or non-whitespace (openai/tiktoken#195): Meta cuts runs this long."""


def llama3_special_tokens(n_base: int) -> dict[str, int]:
    """Meta's 256 special tokens, numbered after the n_base BPE ranks (<|begin_of_text|> = 128000)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_N_SPECIALS - len(LLAMA3_NAMED_SPECIALS))]
    return {token: n_base + i for i, token in enumerate(LLAMA3_NAMED_SPECIALS + tuple(reserved))}


def split_long_runs(text: str) -> Iterator[str]:
    """Meta's slicing of a long input: 400k-character slices, each cut so that no piece holds more
    than 25k whitespace or non-whitespace characters in a row (cuts every 25k characters of a run)."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        part, cut = text[start : start + MAX_ENCODE_CHARS], 0
        for run in re.finditer(r"\s+|\S+", part):  # \s is str.isspace, as in Meta's loop
            for at in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield part[cut:at]
                cut = at
        yield part[cut:]


class TiktokenTokenizer(Tokenizer):
    """Llama 3: tiktoken BPE ranks + Meta's split pattern and 256 special tokens."""

    family: Family = "llama3"

    def __init__(self, path: Path, sha256: str):
        try:  # the hash keeps tiktoken's path-keyed file cache from serving an older file at this path
            ranks = load_tiktoken_bpe(str(path), expected_hash=sha256)
        except ValueError as err:
            raise UserError(f"{path} is not a tiktoken BPE file ({err}); pass the model's own tokenizer.model") from None
        if max(ranks.values(), default=-1) != len(ranks) - 1 or len(set(ranks.values())) != len(ranks):
            raise UserError(f"{path} is not a tiktoken BPE file: its ranks are not 0..{len(ranks) - 1} each once")
        self.special_tokens = llama3_special_tokens(len(ranks))
        self.model = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.stop_ids = frozenset({self.eos_id, self.eom_id, self.eot_id})

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = [i for piece in split_long_runs(text) for i in self.model.encode(piece, allowed_special=set(), disallowed_special=())]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(list(ids))


TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?")
"""The first line of a tiktoken BPE file: a base64 token, a space, its rank."""


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in `path`, SentencePiece or tiktoken as its content says (both are named tokenizer.model)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer {path} not found: pass --tokenizer_path or put tokenizer.model in the model dir")
    content = path.read_bytes()
    if TIKTOKEN_LINE.fullmatch(content.split(b"\n", 1)[0]):
        return TiktokenTokenizer(path, hashlib.sha256(content).hexdigest())
    try:
        return SentencePieceTokenizer(content, str(path))
    except UserError:
        raise UserError(f"{path} is neither a SentencePiece model (Llama 1/2) nor a tiktoken BPE file (Llama 3): "
                        f"pass the model's own tokenizer.model with --tokenizer_path") from None


TOKENIZER = "tokenizer.model"  # the file name every model folder uses


def locate_tokenizer(ckpt_dir: str | Path) -> Optional[Path]:
    """<ckpt_dir>/tokenizer.model, else <ckpt_dir>/original/tokenizer.model (where Hugging Face
    repos of Llama 3 keep Meta's file), else None."""
    places = [Path(ckpt_dir) / TOKENIZER, Path(ckpt_dir) / "original" / TOKENIZER]
    return next((place for place in places if place.is_file()), None)


def find_tokenizer(ckpt_dir: str | Path, override: Optional[str | Path] = None) -> Path:
    """`override` if given, else the tokenizer in the model folder (`locate_tokenizer`)."""
    if override:
        return Path(override)
    found = locate_tokenizer(ckpt_dir)
    if found is None:
        raise UserError(f"no {TOKENIZER} in {ckpt_dir} or {Path(ckpt_dir) / 'original'}: pass --tokenizer_path")
    return found


def special_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """Text -> id of the tokenizer's special tokens (SentencePiece: <unk>, <s>, </s>; Llama 3: its 256),
    the names Hugging Face's tokenizer files and vLLM's /tokenizer_info use for them."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return dict(tokenizer.special_tokens)
    sp = tokenizer.sp
    return {sp.id_to_piece(i): i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0}


# --- text of tokens read in context: the one place for leading spaces and unfinished characters ----------

UNFINISHED = "\ufffd"
"""What `decode` gives for the bytes of a character whose last byte has not come yet."""
WINDOW = 8
"""Tokens of context decoded before a token to find its text: more than a character's 4 UTF-8 bytes."""


def continuation_text(tokenizer: Tokenizer, context: list[int], ids: list[int]) -> str:
    """Text of `ids` as it reads after `context`: decoding them with the last context token keeps the
    leading space SentencePiece drops at the start of a decode."""
    context = context[-1:]
    return tokenizer.decode(context + ids)[len(tokenizer.decode(context)) :]


def shown_part(text: str) -> str:
    """`text` without a trailing unfinished character (shown once its last byte comes)."""
    return text.rstrip(UNFINISHED)


def token_texts(tokenizer: Tokenizer, ids: list[int], start: int = 0) -> list[str]:
    """The text each of ids[start:] adds after the ids before it, leading spaces kept; joined, they
    are the decoded text. A character split over byte tokens belongs to its last byte (the others
    give ""), unless the sequence ends unfinished."""
    texts = []
    for i in range(start, len(ids)):
        context = ids[max(0, i - WINDOW) : i]
        before, after = shown_part(tokenizer.decode(context)), tokenizer.decode(context + [ids[i]])
        texts.append((after if i + 1 == len(ids) else shown_part(after))[len(before) :])
    return texts
