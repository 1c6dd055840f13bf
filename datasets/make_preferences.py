"""Build the demo preference sets dpo_en_demo.jsonl and dpo_zh_demo.jsonl from the bundled alpaca demos.

    python datasets/make_preferences.py          # rewrites both files; the same bytes every time

Per alpaca record with a non-empty output, in file order, one JSON line {prompt, chosen, rejected}:

- prompt: the record's instruction, and its input after a blank line when the input is not empty
  (the text the `chat` template puts in the user turn);
- chosen: the record's own output;
- rejected: the output of another record whose instruction is different, picked by a seeded
  derangement: the records are shuffled with random.Random(SEED) and each takes the output of the
  next one in that cycle (the last takes the first's), so no record gets its own output. Where the
  next record has the same instruction (the demos hold a few duplicates) or the same output, the
  partner is moved further along the cycle; on the bundled demos that never happens, so every
  output is rejected exactly once.

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


def partners(records: list[dict], seed: int) -> list[int]:
    """For each record, the index of the record whose output it is given as rejected (a derangement)."""
    cycle = list(range(len(records)))
    random.Random(seed).shuffle(cycle)
    partner = [0] * len(records)
    for k, i in enumerate(cycle):
        step = 1
        while (records[cycle[(k + step) % len(cycle)]]["instruction"] == records[i]["instruction"]
               or records[cycle[(k + step) % len(cycle)]]["output"] == records[i]["output"]):
            step += 1
        partner[i] = cycle[(k + step) % len(cycle)]
    return partner


def build(source: Path, seed: int = SEED) -> list[dict]:
    """The preference records of one alpaca file."""
    records = [r for r in json.loads(source.read_text(encoding="utf-8")) if r["output"].strip()]
    return [{"prompt": prompt_of(r), "chosen": r["output"], "rejected": records[j]["output"]}
            for r, j in zip(records, partners(records, seed))]


def main() -> None:
    for lang, source in SOURCES.items():
        pairs = build(source)
        target = HERE / f"dpo_{lang}_demo.jsonl"
        target.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        print(f"{target.name}: {len(pairs)} pairs from {source.name}")


if __name__ == "__main__":
    main()
