"""SentencePiece tokenizer with the model's own special ids (never forced to 0)."""

from pathlib import Path

from sentencepiece import SentencePieceProcessor

from llama.errors import UserError


class Tokenizer:
    """Text <-> token ids; `bos_id`, `eos_id`, `pad_id` are read from the model file (-1 = none)."""

    def __init__(self, model_path: str | Path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise UserError(f"tokenizer {model_path} not found: pass --tokenizer_path or put tokenizer.model in the model dir")
        try:
            self.sp = SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as err:
            raise UserError(f"{model_path} is not a SentencePiece model ({err})") from None
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.stop_ids: frozenset[int] = frozenset({self.eos_id})
        """Generation stops at any of these (Llama 2: just EOS)."""

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Ids of `text`, optionally wrapped in BOS/EOS."""
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
