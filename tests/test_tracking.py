"""llama/tuning/tracking.py, read back with the trackers' own formats: TensorBoard's EventAccumulator, W&B's offline run files.

W&B runs offline (WANDB_MODE=offline, its config and cache dirs in tmp): nothing touches the network.
wandb 0.31 ships no Python reader of its .wandb run files (its Go core reads them for `wandb sync`);
the framing is LevelDB's log format behind a 7-byte W&B header, written out in `wandb_records`
with each chunk's CRC checked, and every record is decoded with wandb's own protobuf schema
(wandb.proto.wandb_internal_pb2.Record).
"""

import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llama.errors import UserError
from llama.tuning import tracking
from llama.tuning.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent
CONFIG = {"method": "lora", "lr": 3e-3, "objective": "dpo", "beta": 0.1, "max_steps": 10}


def records(first: int = 0, last: int = 10, offset: float = 0.0) -> list[dict]:
    """What a DPO run appends to metrics.jsonl: a training record per step, evaluations at 0, 5 and 10."""
    out = []
    for step in range(first, last + 1):
        if step % 5 == 0:
            out.append({"step": step, "eval_loss": 0.69 - step / 100 + offset, "eval_rewards/margins": step / 10 + offset})
        if step:
            out.append({"step": step, "loss": 0.7 - step / 50 + offset, "rewards/margins": step / 20 + offset,
                        "rewards/accuracies": 0.5 + step / 40, "lr": 3e-3, "label_tokens": 100 + step, "note": "text is not a scalar"})
    return out


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def expected_scalars(logged: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per name, (step, value as float32: what a TensorBoard scalar event stores) in logging order."""
    out: dict[str, list] = {}
    for record in logged:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                out.setdefault(name, []).append((record["step"], float(np.float32(value))))
    return out


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def wandb_records(path: Path):
    """wandb's protobuf Records of a .wandb file: LevelDB log blocks of 32 KiB, chunks (crc32, length, type) FULL/FIRST/MIDDLE/LAST."""
    from wandb.proto import wandb_internal_pb2

    content = path.read_bytes()
    assert content[:4] == b":W&B" and struct.unpack("<HB", content[4:7]) == (0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(content):
        room = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", content[pos : pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer padding
            pos += room
            continue
        if pos + 7 + length > len(content):  # being written
            return
        chunk = content[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """The records of a finished run's file. wandb-core writes the file's last buffer a few milliseconds
    after run.finish() returns (seen with 0.31: now and then only the 7-byte header is there yet), so
    wait for the run's "exit" record."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(wandb_records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def wandb_runs(out_dir: Path) -> list[dict]:
    """Per offline run folder, in start order: run id, project, name, config keys and history rows {step: {key: value}}."""
    runs = []
    for folder in sorted((out_dir / "wandb").glob("offline-run-*")):
        (run_file,) = folder.glob("run-*.wandb")
        run = {"history": {}}
        for record in finished_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name,
                           start=record.run.start_time.ToNanoseconds(),
                           config={item.key: json.loads(item.value_json) for item in record.run.config.update if item.key != "_wandb"})
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                run["history"][record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
        runs.append(run)
    return sorted(runs, key=lambda run: run["start"])


def test_parse_report_to() -> None:
    parse = tracking.parse_report_to
    assert parse("none") == parse(None) == parse("") == ()
    assert parse("tensorboard") == ("tensorboard",) and parse("wandb") == ("wandb",)
    assert parse("wandb, TensorBoard") == parse("all") == parse("tensorboard,wandb,all") == ("tensorboard", "wandb")
    with pytest.raises(UserError, match="unknown tracker mlflow; choose none, tensorboard, wandb"):
        parse("tensorboard,mlflow")
    with pytest.raises(UserError, match="'none' with other trackers"):
        parse("none,wandb")


def test_a_missing_backend_is_one_clear_error(monkeypatch, tmp_path) -> None:
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    tracking.check_available(("tensorboard",))
    for call in (lambda: tracking.check_available(("tensorboard", "wandb")), lambda: Tracker(tmp_path, ("tensorboard", "wandb"), CONFIG)):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == ("--report_to tensorboard,wandb needs wandb, which is not installed: install the optional extra "
                                  "`track` (pip install -e \".[track]\"), or pass --report_to none")
    assert not (tmp_path / "tensorboard").exists()  # refused before any writer was made


@pytest.mark.slow
def test_check_available_imports_nothing() -> None:
    code = ("import sys; from llama.tuning import tracking; tracking.check_available(('tensorboard', 'wandb')); "
            "assert not {'wandb', 'tensorboard', 'torch.utils.tensorboard'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_tensorboard_holds_every_scalar_at_its_step(tmp_path) -> None:
    logged = records()
    with Tracker(tmp_path, ("tensorboard",), CONFIG) as tracker:
        for record in logged:
            tracker.log(record)
    assert tensorboard_scalars(tmp_path / "tensorboard") == expected_scalars(logged)
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    (text,) = accumulator.Tensors("args/text_summary")  # the config as text, as transformers' TensorBoardCallback logs it
    assert json.loads(text.tensor_proto.string_val[0].decode()) == CONFIG


def test_logging_dir_overrides(tmp_path) -> None:
    with Tracker(tmp_path / "run", ("tensorboard",), CONFIG, logging_dir=tmp_path / "tb") as tracker:
        tracker.log({"step": 1, "loss": 1.0})
    assert tensorboard_scalars(tmp_path / "tb") == {"loss": [(1, 1.0)]} and not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.slow
def test_wandb_offline_run_holds_the_history(tmp_path, offline_wandb) -> None:
    logged = records()
    with Tracker(tmp_path, ("wandb",), CONFIG, project="dpo-tests", run_name="lora-beta0.1") as tracker:
        for record in logged:
            tracker.log(record)
    (run,) = wandb_runs(tmp_path)
    assert (run["project"], run["name"]) == ("dpo-tests", "lora-beta0.1") and run["config"] == CONFIG
    want: dict[int, dict] = {}
    for record in logged:  # records of one step share a history row
        want.setdefault(record["step"], {}).update(tracking.scalars(record))
    assert run["history"] == want
    assert json.loads((tmp_path / "wandb_run.json").read_text()) == {"id": run["id"], "project": "dpo-tests", "step": 10}


@pytest.mark.slow
def test_resume_duplicates_no_step(tmp_path, offline_wandb) -> None:
    """Log 0..10, resume from the checkpoint at step 5 (metrics.jsonl keeps step 5's training record), log 5's eval and 6..10 again."""
    first = records()
    with Tracker(tmp_path, ("tensorboard", "wandb"), CONFIG) as tracker:
        for record in first:
            tracker.log(record)
    kept = [r for r in first if r["step"] < 5 or (r["step"] == 5 and "loss" in r)]  # what train.MetricsLog keeps
    again = [r for r in records(5, 10, offset=1.0) if not (r["step"] == 5 and "loss" in r)]  # what the resumed run writes
    with Tracker(tmp_path, ("tensorboard", "wandb"), CONFIG, resume_step=5, replay=[r for r in kept if r["step"] == 5]) as tracker:
        for record in again:
            tracker.log(record)
    # TensorBoard: exactly metrics.jsonl after the resume, every (name, step) once, the resumed values after step 5
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == expected_scalars(sorted(kept + again, key=lambda r: r["step"]))
    assert all(len({s for s, _ in events}) == len(events) for events in scalars.values())
    # W&B: one run id; the resumed run sends nothing at or before the last step W&B already has (10)
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"] and runs[1]["history"] == {}
    steps = [step for run in runs for step in run["history"]]
    assert sorted(steps) == list(range(11)) and len(steps) == len(set(steps))


@pytest.mark.slow
def test_resume_continues_the_wandb_run_after_its_last_step(tmp_path, offline_wandb) -> None:
    """A run killed after step 7 (checkpoint at 5) and resumed to step 12: steps 8.. reach W&B once, under the same id."""
    with Tracker(tmp_path, ("wandb",), CONFIG) as tracker:
        for record in records(0, 7):
            tracker.log(record)
    with Tracker(tmp_path, ("wandb",), CONFIG, resume_step=5) as tracker:
        for record in records(6, 12, offset=1.0):
            tracker.log(record)
    first, second = wandb_runs(tmp_path)
    assert first["id"] == second["id"] and sorted(first["history"]) == list(range(8)) and sorted(second["history"]) == list(range(8, 13))
    assert second["history"][10]["eval_loss"] == pytest.approx(0.59 + 1.0)
    assert json.loads((tmp_path / "wandb_run.json").read_text())["step"] == 12


@pytest.mark.slow
def test_a_fresh_run_starts_a_new_wandb_run(tmp_path, offline_wandb) -> None:
    for _ in range(2):
        with Tracker(tmp_path, ("wandb",), CONFIG) as tracker:
            tracker.log({"step": 1, "loss": 1.0})
    first, second = wandb_runs(tmp_path)
    assert first["id"] != second["id"] and second["history"] == {1: {"loss": 1.0}}
