"""Experiment tracking on rank 0: every scalar a run writes to metrics.jsonl, at the same step, in TensorBoard and/or W&B.

`--report_to` follows transformers' convention ("none", "tensorboard", "wandb", comma-separated,
"all" for both). Both packages are optional (the `track` extra); `check_available` says which one is
missing before any work, without importing either (the import alone takes seconds).

A `Tracker` takes the very dicts appended to metrics.jsonl (`train.MetricsLog`): each numeric
value becomes a scalar under its own name ("loss", "rewards/margins", "eval_loss", ...) at the
record's "step", and the run's configuration is logged once, as transformers' TensorBoardCallback
does (the JSON as text, "args") and as the W&B run's config.

Resuming (`resume_step`: the step of the checkpoint the run continues from):
- TensorBoard: the writer's purge_step drops every event at step >= resume_step (TensorBoard's
  readers discard what a restarted run wrote past its restart point); `replay` then logs again the
  records metrics.jsonl keeps at resume_step (MetricsLog keeps that step's training record and
  drops its evaluation, which the resumed run redoes), so TensorBoard ends up holding exactly what
  metrics.jsonl holds.
- W&B: the run id is kept in `<out_dir>/wandb_run.json`, and the resumed run reopens that run with
  resume="allow" (on every W&B server, and offline). W&B's history only grows: a server drops
  steps below the run's last one. So the tracker keeps the last step it sent in the same file and
  sends nothing at or before it after a resume; offline files then hold every step once, as the
  server would. Steps between resume_step and the earlier run's last step keep the earlier run's
  values (the same values for an exact resume). W&B's rewind (`resume_from`, which truncates the
  history) was not taken: it is in private preview on W&B's cloud and absent from self-hosted servers.
"""

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from llama.errors import UserError
from llama.files import atomic_write_text

BACKENDS = ("tensorboard", "wandb")
WANDB_STATE = "wandb_run.json"
INSTALL = 'pip install -e ".[track]"'


def parse_report_to(text: Optional[str]) -> tuple[str, ...]:
    """'none' | 'tensorboard' | 'wandb' | 'tensorboard,wandb' | 'all' -> the backends, in BACKENDS order."""
    names = {name.strip().lower() for name in (text or "none").split(",") if name.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(BACKENDS)
    if "none" in names and len(names) > 1:
        raise UserError(f"--report_to {text!r} names 'none' with other trackers: pass none alone, or only the trackers")
    unknown = names - set(BACKENDS) - {"none"}
    if unknown:
        raise UserError(f"--report_to: unknown tracker {', '.join(sorted(unknown))}; choose none, tensorboard, wandb, "
                        f"tensorboard,wandb or all")
    return tuple(name for name in BACKENDS if name in names)


def check_available(backends: Iterable[str]) -> None:
    """A UserError naming the missing packages and the `track` extra; nothing is imported."""
    backends = tuple(backends)
    missing = [name for name in backends if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--report_to {','.join(backends)} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        f"not installed: install the optional extra `track` ({INSTALL}), or pass --report_to none")


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a metrics record, "step" aside (booleans and text are not scalars)."""
    return {name: float(value) for name, value in record.items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Tracker:
    """Rank 0's trackers for one run; `log` every metrics.jsonl record, `close` at the end.

    TensorBoard writes to `logging_dir` (default <out_dir>/tensorboard), W&B to <out_dir>/wandb
    (`project`, default $WANDB_PROJECT or "llama-mp", and `run_name`). On resume, pass the
    checkpoint's step as `resume_step` and, as `replay`, the records metrics.jsonl holds at that
    step after train.MetricsLog has trimmed it.
    """

    def __init__(self, out_dir: str | Path, backends: Sequence[str], config: dict, logging_dir: Optional[str | Path] = None,
                 project: Optional[str] = None, run_name: Optional[str] = None, resume_step: Optional[int] = None,
                 replay: Sequence[dict] = ()):
        out_dir = Path(out_dir)
        check_available(backends)
        self.backends: list = []
        if "tensorboard" in backends:
            self.backends.append(TensorBoard(Path(logging_dir) if logging_dir else out_dir / "tensorboard", config, resume_step))
        if "wandb" in backends:
            self.backends.append(WandB(out_dir, config, project, run_name, resumed=resume_step is not None))
        for record in replay:
            self.log(record)

    def log(self, record: dict) -> None:
        """Every numeric scalar of `record` at its "step"."""
        values = scalars(record)
        if values:
            for backend in self.backends:
                backend.log(int(record["step"]), values)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoard:
    """torch.utils.tensorboard's SummaryWriter: scalars, and the config as the text "args"."""

    def __init__(self, log_dir: Path, config: dict, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)
        self.writer.add_text("args", json.dumps(config, indent=2, sort_keys=True, default=str), global_step=resume_step or 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run in <out_dir>/wandb; its id and last logged step in <out_dir>/wandb_run.json."""

    def __init__(self, out_dir: Path, config: dict, project: Optional[str], run_name: Optional[str], resumed: bool):
        import wandb

        self.state_path = out_dir / WANDB_STATE
        state = _read_state(self.state_path) if resumed else None
        self.run_id = state["id"] if state else _new_run_id()
        self.project = project or (state or {}).get("project") or os.environ.get("WANDB_PROJECT") or "llama-mp"
        self.logged_through = state["step"] if state else -1  # the earlier run's last step: not sent again
        self.last_step = self.logged_through
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=self.project, name=run_name, id=self.run_id, resume="allow", dir=str(out_dir),
                                  config=config, allow_val_change=True)
        except wandb.errors.Error as err:
            raise UserError(f"W&B could not start the run ({err}); log in with `wandb login`, or set WANDB_MODE=offline "
                            f"to keep the run on disk (upload it later with `wandb sync`)") from None
        self._save_state()

    def log(self, step: int, values: dict[str, float]) -> None:
        if step <= self.logged_through:
            return
        self.run.log(values, step=step)
        if step != self.last_step:
            self.last_step = step
            self._save_state()

    def _save_state(self) -> None:
        state = {"id": self.run_id, "project": self.project, "step": self.last_step}
        atomic_write_text(json.dumps(state) + "\n", self.state_path)

    def close(self) -> None:
        self.run.finish()


def _read_state(path: Path) -> Optional[dict]:
    """The W&B run of an earlier run in this folder, or None (it did not use W&B)."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if isinstance(state.get("id"), str) and isinstance(state.get("step"), int):
            return state
    except (OSError, ValueError, AttributeError):
        pass
    raise UserError(f"{path} is not the W&B state this project writes ({{'id', 'project', 'step'}}); delete it to start a new W&B run")


def _new_run_id() -> str:
    """A fresh W&B run id (wandb's own generator)."""
    from wandb.sdk.lib import runid

    return runid.generate_id()

