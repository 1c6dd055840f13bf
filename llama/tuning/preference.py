"""Preference pairs for DPO: records -> (prompt, chosen, rejected) token ids -> one batch of 2B rows.

Two record formats, told apart per record (a JSON list or JSONL file, as SFT data):

- explicit prompt (TRL's explicit-prompt format, Anthropic HH style): `prompt`, `chosen` and
  `rejected` strings. Each response is tokenized exactly as the SFT record {instruction: prompt,
  input: "", output: response} would be (`data.encode`): BOS + the prompt under `--template`, then
  the response + EOS (the family's end of turn under the chat template).
- message lists (UltraFeedback style): `chosen` and `rejected` are lists of {role, content}
  messages that share every turn but the last, a different assistant answer. The shared turns are
  the prompt, in the model family's chat format (`chat.dialog_tokens`; this format needs
  `--template chat`), each answer `chat.answer_tokens`. A `prompt` that is itself a message list
  (TRL's conversational explicit-prompt format) goes in front of both; a `prompt` string next to
  message lists (ultrafeedback_binarized repeats the first user turn there) is not used.

Over-long pairs: the prompt is kept whole and each response cut so that prompt + response fits
max_seq_len (counted as truncated); a pair whose prompt leaves no room for one response token, or
whose two responses are cut to the same tokens (no preference left to learn), is dropped and
counted. Cutting the prompt instead would make the policy and the reference compare the two
answers to a question they never saw whole.

Like llama/tuning/data.py, everything is a pure function of the files and a seed, so every rank
builds the same split and the same batches without communicating. `collate_pairs` stacks the
chosen rows over the rejected rows, so both responses of every pair go through one forward.
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from llama import chat
from llama.errors import UserError
from llama.tokenizer import Tokenizer
from llama.tuning import data
from llama.tuning.data import IGNORE_INDEX

FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("instruction", "output", "messages", "conversations")
"""Field names of supervised (SFT) data, to recognise it when it is given as preference data."""


@dataclass
class Record:
    """One checked record: text responses, and the prompt as a string or as the shared chat turns."""

    where: str  # "line 3" or "record 2 (0-based)", for error messages
    prompt: str | list[chat.Message]
    chosen: str
    rejected: str


@dataclass
class Pair:
    prompt: list[int]  # BOS + the prompt under the template (chat: up to the assistant header)
    chosen: list[int]  # chosen response + EOS / end of turn, unless truncated
    rejected: list[int]  # rejected response, the same way

    @property
    def length(self) -> int:
        """Positions of the longer of its two rows."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class Pairs:
    pairs: list[Pair]
    n_truncated: int  # kept pairs with a response cut to fit max_seq_len
    n_dropped: int  # pairs removed: no room for a response token, or both responses cut to the same tokens

    def summary(self) -> str:
        """One line for the training log."""
        return (f"data: {len(self.pairs)} preference pairs, {self.n_truncated} with a response truncated to max_seq_len, "
                f"{self.n_dropped} dropped (no room for a response, or no difference left)")


@dataclass
class PairSplits:
    train: list[Pair]
    val: list[Pair]
    n_truncated: int
    n_dropped: int

    def summary(self) -> str:
        """One line for the training log."""
        return (f"data: {len(self.train)} train / {len(self.val)} val preference pairs, {self.n_truncated} with a response "
                f"truncated to max_seq_len, {self.n_dropped} dropped (no room for a response, or no difference left)")


# ---- records ----------------------------------------------------------------------------------


def field_names(field_map: Optional[dict[str, str]]) -> dict[str, str]:
    """Our field names -> the file's (a field map renames prompt, chosen, rejected)."""
    unknown = set(field_map or {}) - set(FIELDS)
    if unknown:
        raise UserError(f"field map names {sorted(unknown)} are not preference fields; map only {', '.join(FIELDS)}")
    return {name: (field_map or {}).get(name, name) for name in FIELDS}


def read_items(path: str | Path) -> list[tuple[str, object]]:
    """(location, value) per record of a JSON list or JSONL file (data._parse), with data's file checks."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference data {path} not found: pass a .json or .jsonl file of prompt/chosen/rejected records")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    items = data._parse(path, text) if text.strip() else []
    if not items:
        raise UserError(f"preference data {path} holds no records: it needs prompt/chosen/rejected records")
    return items


def load_records(path: str | Path, field_map: Optional[dict[str, str]] = None) -> list[Record]:
    """Every record of a preference file, checked; the first bad one is a UserError naming its place."""
    names = field_names(field_map)
    return [check_record(Path(path), where, item, names) for where, item in read_items(path)]


def check_record(path: Path, where: str, item: object, names: dict[str, str]) -> Record:
    """One record in either format, or a UserError naming the file, the record and the fix."""
    at = f"{path}: {where}"
    if not isinstance(item, dict):
        raise UserError(f"{at} is a {type(item).__name__}, not an object with {names['chosen']!r} and {names['rejected']!r} fields")
    _check_fields(at, item, names)
    chosen, rejected = item[names["chosen"]], item[names["rejected"]]
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _message_record(at, where, item.get(names["prompt"]), chosen, rejected, names)
    prompt = item[names["prompt"]]
    for ours, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise UserError(f"{at} field {names[ours]!r} is a {type(value).__name__}, not a string; write prompt, chosen and "
                            f"rejected as strings, or chosen and rejected as lists of chat messages")
    _check_responses(at, chosen, rejected, names)
    return Record(where, prompt, chosen, rejected)


def _check_fields(at: str, item: dict, names: dict[str, str]) -> None:
    """chosen and rejected always; prompt too unless both responses are message lists."""
    lists = isinstance(item.get(names["chosen"]), list) and isinstance(item.get(names["rejected"]), list)
    missing = [names[ours] for ours in FIELDS if names[ours] not in item and not (ours == "prompt" and lists)]
    if not missing:
        return
    has = ", ".join(map(repr, item)) or "nothing"
    sft = [name for name in SFT_FIELDS if name in item]
    hint = (f"this looks like SFT data ({', '.join(map(repr, sft))}), not preference pairs: DPO needs a prompt with a chosen and a "
            f"rejected response per record" if sft else "add them")
    raise UserError(f"{at} has no {', '.join(map(repr, missing))} field{'s' if len(missing) > 1 else ''} (it has {has}); "
                    f"{hint}, or map the file's names with a field map (e.g. prompt=question,chosen=good,rejected=bad)")


def _check_responses(at: str, chosen: str, rejected: str, names: dict[str, str]) -> None:
    for ours, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise UserError(f"{at} has an empty {names[ours]!r} response; a pair needs two non-empty responses: fix or remove the record")
    if chosen == rejected:
        raise UserError(f"{at}: {names['chosen']!r} and {names['rejected']!r} are the same response, which teaches no "
                        f"preference; fix or remove the record")


def _message_record(at: str, where: str, prompt: object, chosen: list, rejected: list, names: dict[str, str]) -> Record:
    """UltraFeedback style: both lists share all turns but the last, which is an assistant answer."""
    prefix = prompt if isinstance(prompt, list) else []  # TRL's conversational prompt; a string prompt is not used
    for ours, dialog in (("prompt", prefix), ("chosen", chosen), ("rejected", rejected)):
        for i, message in enumerate(dialog):
            if not isinstance(message, dict) or message.get("role") not in chat.ROLES or not isinstance(message.get("content"), str):
                raise UserError(f"{at} field {names[ours]!r}: message {i} must be {{'role': one of {', '.join(chat.ROLES)}, "
                                f"'content': a string}}, got {message!r:.80}")
    for ours, dialog in (("chosen", chosen), ("rejected", rejected)):
        if not dialog or dialog[-1]["role"] != "assistant":
            raise UserError(f"{at} field {names[ours]!r} does not end with an assistant message; each list must end with "
                            f"the answer being compared")
    if chosen[:-1] != rejected[:-1]:
        raise UserError(f"{at}: {names['chosen']!r} and {names['rejected']!r} do not share their leading turns; the two lists "
                        f"must hold the same conversation and differ only in the final assistant answer")
    shared = list(prefix) + chosen[:-1]
    if not shared:
        raise UserError(f"{at} has no prompt: put at least one message (the user's) before the final assistant answer")
    _check_responses(at, chosen[-1]["content"], rejected[-1]["content"], names)
    return Record(where, shared, chosen[-1]["content"], rejected[-1]["content"])


# ---- tokens -----------------------------------------------------------------------------------


def encode_record(record: Record, tokenizer: Tokenizer, template: str, path: Path) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids), each response tokenized as an SFT response (data.encode)."""
    if isinstance(record.prompt, str):
        prompt, chosen = data.encode({"instruction": record.prompt, "input": "", "output": record.chosen}, tokenizer, template)
        _, rejected = data.encode({"instruction": record.prompt, "input": "", "output": record.rejected}, tokenizer, template)
        return prompt, chosen, rejected
    if template != "chat":
        raise UserError(f"{path}: {record.where} holds chat messages, which are written in the model family's chat format: "
                        f"pass --template chat (it is {template!r})")
    try:
        prompt = chat.dialog_tokens(tokenizer, record.prompt)
    except UserError as err:
        raise UserError(f"{path}: {record.where}: {err}") from None
    return prompt, chat.answer_tokens(tokenizer, record.chosen), chat.answer_tokens(tokenizer, record.rejected)


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_seq_len: int) -> tuple[Optional[Pair], bool]:
    """(pair, truncated): the prompt kept whole, each response cut to max_seq_len - len(prompt) tokens.

    None when the prompt leaves no room for a response token, or when cutting leaves the two
    responses equal (their log-ratios would cancel: nothing to learn).
    """
    room = max_seq_len - len(prompt)
    if room < 1:
        return None, True
    truncated = max(len(chosen), len(rejected)) > room
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        return None, truncated
    return Pair(prompt, chosen, rejected), truncated


def tokenize_records(records: Sequence[Record], tokenizer: Tokenizer, *, template: str, max_seq_len: int, path: Path,
                     progress: Optional[tqdm] = None) -> Pairs:
    """Pairs of the records in order, with the truncated and dropped counts."""
    pairs, n_truncated, n_dropped = [], 0, 0
    for record in records:
        pair, truncated = fit_pair(*encode_record(record, tokenizer, template, path), max_seq_len)
        if pair is None:
            n_dropped += 1
        else:
            pairs.append(pair)
            n_truncated += truncated
        if progress is not None:
            progress.update()
    return Pairs(pairs, n_truncated, n_dropped)


def _check_settings(template: str, max_seq_len: int) -> None:
    data.check_template(template)
    if max_seq_len < 2:
        raise UserError(f"max_seq_len {max_seq_len} is too small: a pair needs at least BOS and one response token")


def load_pairs(path: str | Path, tokenizer: Tokenizer, *, template: str, max_seq_len: int, field_map: Optional[dict[str, str]] = None,
               max_examples: Optional[int] = None, show_progress: bool = False) -> Pairs:
    """The pairs of one file in file order (the first max_examples records): an explicit held-out set."""
    _check_settings(template, max_seq_len)
    records = load_records(path, field_map)[:max_examples or None]
    with tqdm(total=len(records), desc="tokenizing pairs", disable=not show_progress) as progress:
        return tokenize_records(records, tokenizer, template=template, max_seq_len=max_seq_len, path=Path(path), progress=progress)


def build_pair_splits(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    template: str = "alpaca",
    max_seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 0,
    field_map: Optional[dict[str, str]] = None,
    max_examples: Optional[int] = None,
    val_path: Optional[str | Path] = None,
    show_progress: bool = False,
) -> PairSplits:
    """Load, shuffle by seed, keep max_examples, split off validation (or read val_path), tokenize.

    As data.build_splits: the split is made on records, so it does not move with max_seq_len.
    With val_path the held-out pairs are that file's, in its order, and val_fraction is not used.
    """
    _check_settings(template, max_seq_len)
    held_out, kept = data.split_records(load_records(path, field_map), path, val_fraction=val_fraction, seed=seed,
                                        max_examples=max_examples, explicit_val=val_path is not None, unit="pair")
    with tqdm(total=len(held_out) + len(kept), desc="tokenizing pairs", disable=not show_progress) as progress:
        val = tokenize_records(held_out, tokenizer, template=template, max_seq_len=max_seq_len, path=Path(path), progress=progress)
        train = tokenize_records(kept, tokenizer, template=template, max_seq_len=max_seq_len, path=Path(path), progress=progress)
    if val_path is not None:
        val = load_pairs(val_path, tokenizer, template=template, max_seq_len=max_seq_len, field_map=field_map, show_progress=show_progress)
    if not train.pairs:
        raise UserError(f"{path}: every training pair's prompt fills max_seq_len {max_seq_len}, so no response token is left; "
                        f"raise --max_seq_len")
    return PairSplits(train.pairs, val.pairs, train.n_truncated + val.n_truncated, train.n_dropped + val.n_dropped)


# ---- batches ----------------------------------------------------------------------------------


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels [2B, T]: rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected.

    Right-padded with pad_id; labels are the response tokens (aligned with input_ids, the loss
    shifts by one, HF's convention) and IGNORE_INDEX on the prompt and the padding.
    """
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    examples = [data.Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response) for prompt, response in rows]
    return data.collate(examples, pad_id)


class PairBatches:
    """This data-parallel rank's batches of pairs, epoch after epoch, as train.TrainBatches.

    Every step has one global batch of batch_size x dp_size pairs, shuffled per epoch from
    (seed, epoch) by data.batch_indices, and rank r takes its r-th slice; (epoch, position) is the
    whole state, so a checkpoint holding it resumes on the very next batch.
    """

    def __init__(self, pairs: Sequence[Pair], batch_size: int, *, seed: int, dp_rank: int, dp_size: int, pad_id: int,
                 group_by_length: bool = False, epoch: int = 0, position: int = 0):
        self.pairs, self.pad_id = pairs, pad_id
        lengths = [pair.length for pair in pairs]
        self.order = partial(data.batch_indices, lengths, batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size, group_by_length=group_by_length)
        self.epoch, self.position = epoch, position
        self.batches = self.order(epoch=epoch)

    def next(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], int]:
        """The next batch ([2B, T] input_ids, labels, and the pairs' indices [B]) and its number of real
        (non-pad) tokens."""
        if self.position == len(self.batches):
            self.epoch, self.position = self.epoch + 1, 0
            self.batches = self.order(epoch=self.epoch)
        indices = self.batches[self.position]
        chosen = [self.pairs[i] for i in indices]
        self.position += 1
        n_tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in chosen)
        return (*collate_pairs(chosen, self.pad_id), torch.tensor(indices)), n_tokens

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def eval_pair_batches(pairs: Sequence[Pair], batch_size: int, *, dp_rank: int, dp_size: int, pad_id: int,
                      limit: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's share of the held-out pairs, in order, collated with their indices (limit 0 = all batches)."""
    mine = list(range(dp_rank, len(pairs), dp_size))
    batches = [(*collate_pairs([pairs[i] for i in mine[s : s + batch_size]], pad_id), torch.tensor(mine[s : s + batch_size]))
               for s in range(0, len(mine), batch_size)]
    return batches[:limit] if limit else batches
