"""Build the demo preference sets dpo_en_demo.jsonl and dpo_zh_demo.jsonl from the bundled alpaca demos.

    python datasets/make_preferences.py          # rewrites both files; the same bytes every time

The alpaca records with a non-empty output are shuffled with random.Random(SEED) and taken two by
two; each couple (a, b) gives one JSON line {prompt, chosen, rejected}:

- prompt: a's instruction, and its input after a blank line when the input is not empty (the text
  the `chat` template puts in the user turn);
- chosen: a's own output;
- rejected: b's output (an answer to another instruction; b is skipped for the next record when its
  instruction or output equals a's: the demos hold a few duplicates).

So every output appears in one pair only, chosen or rejected. (Pairing each record with the next
one's output would use every output twice, once chosen and once rejected, and a held-out pair would
then hold two training responses with their preferences reversed: nothing could be learned.)

The pairs are easy on purpose: an answer to another question is plainly worse, so a short DPO run
on a tiny model can learn to prefer the chosen answers (the reward accuracy rises). They test the
machinery, not alignment. Licence: derived from the alpaca demos, so CC BY-NC 4.0, research only
(datasets/LICENSE.md).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = {"en": HERE / "alpaca_en_demo.json", "zh": HERE / "alpaca_zh_demo.json"}
SEED = 0


def prompt_of(record: dict) -> str:
    """The instruction, then the input after a blank line when there is one."""
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def couples(records: list[dict], seed: int) -> list[tuple[dict, dict]]:
    """(a, b) couples of distinct records, each record in one couple at most, in a seeded order."""
    order = list(records)
    random.Random(seed).shuffle(order)
    out = []
    while len(order) >= 2:
        a = order.pop(0)
        k = next((k for k, b in enumerate(order) if b["instruction"] != a["instruction"] and b["output"] != a["output"]), None)
        if k is None:
            break
        out.append((a, order.pop(k)))
    return out


def build(source: Path, seed: int = SEED) -> list[dict]:
    """The preference records of one alpaca file."""
    records = [r for r in json.loads(source.read_text(encoding="utf-8")) if r["output"].strip()]
    return [{"prompt": prompt_of(a), "chosen": a["output"], "rejected": b["output"]} for a, b in couples(records, seed)]


def main() -> None:
    for lang, source in SOURCES.items():
        pairs = build(source)
        target = HERE / f"dpo_{lang}_demo.jsonl"
        target.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        print(f"{target.name}: {len(pairs)} pairs from {source.name}")


if __name__ == "__main__":
    main()
