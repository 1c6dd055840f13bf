"""Instruction data for prompt tuning: alpaca-format records -> masked token ids -> padded batches.

The pipeline is four plain steps: `load_records` (JSON list or JSONL) -> `render` (a prompt template)
-> `tokenize` (labels = IGNORE_INDEX on the prompt) -> `batch_indices` + `collate` (one epoch of
batches for this data-parallel rank). Everything is a pure function of the file and a seed, so every
rank computes the same split and the same batch order without communicating: tensor-parallel ranks
of one data-parallel group pass the same `dp_rank` and see identical batches.

Prompt and response are encoded separately and concatenated, so the label boundary is exact by
construction: encoding the joined text and masking the first len(encode(prompt)) tokens (Stanford
Alpaca's code) can be off by one where BPE merges across the boundary.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from llama import chat
from llama.chat import B_INST, E_INST
from llama.errors import UserError
from llama.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label torch.nn.functional.cross_entropy skips by default
TEMPLATES = ("alpaca", "chat", "llama2-chat", "plain")
"""chat: one user turn in the tokenizer family's own chat format (llama/chat.py); the others are text."""
FIELDS = ("instruction", "input", "output")
REQUIRED = ("instruction", "output")

# Stanford Alpaca's two prompts, verbatim (tatsu-lab/stanford_alpaca train.py, PROMPT_DICT).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass
class Example:
    input_ids: list[int]  # starts with BOS, ends with EOS or the chat end of turn (unless truncated)
    labels: list[int]  # same length; IGNORE_INDEX on prompt tokens; the loss shifts by one (HF convention)


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    n_truncated: int  # kept examples cut to max_seq_len
    n_dropped: int  # examples removed because truncation left no label token

    def summary(self) -> str:
        """One line for the training log."""
        return (f"data: {len(self.train)} train / {len(self.val)} val examples, "
                f"{self.n_truncated} truncated to max_seq_len, {self.n_dropped} dropped (no label left)")


def parse_field_map(text: Optional[str]) -> Optional[dict[str, str]]:
    """'instruction=prompt,output=completion' -> {"instruction": "prompt", "output": "completion"}."""
    if not text:
        return None
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[1].strip() for pair in pairs):
        raise UserError(f"bad field map {text!r}: write OURS=THEIRS pairs separated by commas, e.g. instruction=prompt,output=completion")
    return {ours.strip(): theirs.strip() for ours, theirs in pairs}


def _parse(path: Path, text: str) -> list[tuple[str, object]]:
    """(location, value) per record: a JSON list if the content starts with '[', else JSON lines."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno} ({err.msg}); fix the file") from None
        return [(f"record {i} (0-based)", item) for i, item in enumerate(items)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {lineno} is not valid JSON ({err.msg}); each JSONL line must be one JSON object") from None
    return records


def _check_record(path: Path, where: str, item: object, names: dict[str, str]) -> dict[str, str]:
    """Our three fields of one record; a missing or null input means no input."""
    if not isinstance(item, dict):
        raise UserError(f"{path}: {where} is a {type(item).__name__}, not an object with {names['instruction']!r} and {names['output']!r} fields")
    for ours in REQUIRED:
        if names[ours] not in item:
            has = ", ".join(map(repr, item)) or "nothing"
            raise UserError(f"{path}: {where} has no {names[ours]!r} field (it has {has}); "
                            f"add it, or map the file's name for it with a field map ({ours}=NAME)")
    record = {ours: item.get(names[ours]) for ours in FIELDS}
    record["input"] = "" if record["input"] is None else record["input"]
    for ours, value in record.items():
        if not isinstance(value, str):
            raise UserError(f"{path}: {where} field {names[ours]!r} is a {type(value).__name__}, not a string; fix the record")
    return record


def load_records(path: str | Path, field_map: Optional[dict[str, str]] = None) -> list[dict[str, str]]:
    """Records {instruction, input, output} from a JSON list or JSONL file (detected by content).

    field_map maps our names to the file's, e.g. {"instruction": "prompt", "output": "completion"}.
    """
    path = Path(path)
    unknown = set(field_map or {}) - set(FIELDS)
    if unknown:
        raise UserError(f"field map names {sorted(unknown)} are not ours; map only {', '.join(FIELDS)}")
    names = {name: (field_map or {}).get(name, name) for name in FIELDS}
    if not path.is_file():
        raise UserError(f"dataset {path} not found: pass the path of an alpaca-format .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"dataset {path} is empty: it needs alpaca-format records (instruction, input, output)")
    items = _parse(path, text)
    if not items:
        raise UserError(f"dataset {path} holds no records: it needs alpaca-format records (instruction, input, output)")
    return [_check_record(path, where, item, names) for where, item in items]


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}")


def render(record: dict[str, str], template: str) -> tuple[str, str]:
    """(prompt text, response text) of one record under a template; for "chat", the texts of the
    user message and the answer, which `encode` places in the chat format's tokens."""
    check_template(template)
    instruction, input_, output = record["instruction"], record["input"], record["output"]
    if template == "alpaca":
        prompt = (ALPACA_WITH_INPUT if input_ else ALPACA_NO_INPUT).format(instruction=instruction, input=input_)
        return prompt, output
    user = f"{instruction}\n\n{input_}" if input_ else instruction
    if template == "chat":
        return user, output
    if template == "llama2-chat":  # as chat.llama2_tokens writes one user turn
        return f"{B_INST} {user.strip()} {E_INST}", output.strip()
    return (f"{instruction}\n{input_}" if input_ else instruction), output


def encode(record: dict[str, str], tokenizer: Tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): BOS + prompt, then response + EOS.

    "chat" takes both from llama/chat.py: the prompt is exactly what `Llama.chat_tokens` feeds at
    inference (up to and including the assistant header for Llama 3), the response ends with the
    family's end of turn (<|eot_id|> for Llama 3). Special tokens go in by id, never through text.
    """
    prompt, response = render(record, template)
    if template == "chat":
        return chat.dialog_tokens(tokenizer, [{"role": "user", "content": prompt}]), chat.answer_tokens(tokenizer, response)
    return tokenizer.encode(prompt, bos=True, eos=False), tokenizer.encode(response, bos=False, eos=True)


def tokenize(
    record: dict[str, str], tokenizer: Tokenizer, template: str, max_seq_len: int, train_on_inputs: bool = False
) -> tuple[Optional[Example], bool]:
    """(example, truncated): prompt then response (`encode`); keeps the first max_seq_len tokens.

    The example is None when nothing is left to learn: no label on positions 1.. (position 0 is
    never a target once the loss shifts).
    """
    prompt_ids, response_ids = encode(record, tokenizer, template)
    input_ids = prompt_ids + response_ids
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + response_ids
    truncated = len(input_ids) > max_seq_len
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None, truncated
    return Example(input_ids, labels), truncated


def _tokenize_all(records: list[dict[str, str]], tokenizer: Tokenizer, template: str, max_seq_len: int,
                  train_on_inputs: bool, progress: tqdm) -> tuple[list[Example], int, int]:
    examples, n_truncated, n_dropped = [], 0, 0
    for record in records:
        example, truncated = tokenize(record, tokenizer, template, max_seq_len, train_on_inputs)
        if example is None:
            n_dropped += 1
        else:
            examples.append(example)
            n_truncated += truncated
        progress.update()
    return examples, n_truncated, n_dropped


def split_records(records: list, path: str | Path, *, val_fraction: float, seed: int, max_examples: Optional[int], explicit_val: bool,
                  unit: str = "record") -> tuple[list, list]:
    """(held-out, train) records: shuffled by seed, the first max_examples kept, the first round(n x val_fraction)
    (at least one) held out; none held out when the held-out set comes from its own file (explicit_val).
    SFT examples and preference pairs are split alike, on records, so a split does not move with max_seq_len."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction {val_fraction} must be in [0, 1)")
    random.Random(f"split-{seed}").shuffle(records)
    records = records[:max_examples] if max_examples else records
    n_val = max(1, round(len(records) * val_fraction)) if val_fraction > 0 and not explicit_val else 0
    if n_val >= len(records):
        held = f"{len(records)} {unit}{'s' * (len(records) != 1)}"
        raise UserError(f"{path}: {held} leave{'s' * (len(records) == 1)} none for training with val_fraction {val_fraction}; lower it or add data")
    return records[:n_val], records[n_val:]


def build_splits(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    template: str = "alpaca",
    max_seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 0,
    train_on_inputs: bool = False,
    field_map: Optional[dict[str, str]] = None,
    max_examples: Optional[int] = None,
    val_path: Optional[str | Path] = None,
    show_progress: bool = False,
) -> Splits:
    """Load, shuffle by seed, keep max_examples, split off validation (or read it from val_path), tokenize.

    The split is made on records, before tokenizing, so it does not move when max_seq_len changes.
    With val_path the held-out examples are that file's, in its order, and val_fraction is not used.
    """
    check_template(template)
    if max_seq_len < 2:
        raise UserError(f"max_seq_len {max_seq_len} is too small: an example needs at least BOS and one label token")
    held_out, kept = split_records(load_records(path, field_map), path, val_fraction=val_fraction, seed=seed, max_examples=max_examples,
                                   explicit_val=val_path is not None)
    if val_path is not None:
        held_out = load_records(val_path, field_map)
    with tqdm(total=len(kept) + len(held_out), desc="tokenizing", disable=not show_progress) as progress:
        val, val_cut, val_drop = _tokenize_all(held_out, tokenizer, template, max_seq_len, train_on_inputs, progress)
        train, train_cut, train_drop = _tokenize_all(kept, tokenizer, template, max_seq_len, train_on_inputs, progress)
    if not train:
        raise UserError(f"{path}: every training example is longer than max_seq_len {max_seq_len} before its response "
                        f"starts, so no label token is left; raise --max_seq_len")
    return Splits(train, val, train_cut + val_cut, train_drop + val_drop)


def batch_indices(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, dp_rank: int = 0, dp_size: int = 1, group_by_length: bool = False
) -> list[list[int]]:
    """This data-parallel rank's batches (example indices) for one epoch, a pure function of (seed, epoch).

    Each step has one global batch of batch_size * dp_size shuffled examples and rank r takes its
    r-th slice, so ranks get disjoint data and the same number of batches (the tail is dropped;
    the shuffle changes each epoch, so different examples fall off). With group_by_length, chunks of
    50 global batches are sorted by length before cutting (less padding), then the batch order is
    shuffled again so long and short batches mix over the epoch.
    """
    global_size = batch_size * dp_size
    if len(lengths) < global_size:
        raise UserError(f"{len(lengths)} training examples cannot fill one batch of {batch_size} x {dp_size} data-parallel ranks; "
                        f"lower the batch size or add data")
    rng = random.Random(f"batches-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[: len(order) // global_size * global_size]
    if group_by_length:
        mega = 50 * global_size
        order = [i for start in range(0, len(order), mega) for i in sorted(order[start : start + mega], key=lambda i: lengths[i])]
    batches = [order[start : start + global_size] for start in range(0, len(order), global_size)]
    if group_by_length:
        rng.shuffle(batches)
    return [batch[dp_rank * batch_size : (dp_rank + 1) * batch_size] for batch in batches]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: input_ids [B, T] with pad_id, labels [B, T] with IGNORE_INDEX.

    Right padding needs no attention mask under a causal mask: real tokens never see the pads after them.
    """
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return input_ids, labels
