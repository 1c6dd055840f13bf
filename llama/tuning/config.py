"""A tuning run's configuration: every ft_main.py option, parsed once into a frozen dataclass.

`TrainConfig` is built at the command-line edge (ft_main.py), passed whole to the loop and the
methods, and written as readable JSON into the run's folder (`run_config.json`), which `--resume`
reads back. Its fields carry the command-line options' names (the model's are `LoadSpec`'s), each
with a default, so a run saved before an option existed resumes after it with that default.
A run saved before run_config.json existed kept its options inside `ckpt.pt`; `from_options` reads
those too.
"""

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from llama.config import LoadSpec, from_json, to_json
from llama.errors import UserError
from llama.files import atomic_write_text, read_json
from llama.tuning.dpo import DPOConfig
from llama.tuning.tracking import check_available

CONFIG = "run_config.json"
METHOD_DEFAULTS = {  # per method: learning rate and output folder
    "prompt": {"lr": 0.03, "out_dir": "runs/prompt_tuning"},
    "lora": {"lr": 3e-3, "out_dir": "runs/lora"},
    "full": {"lr": 1e-3, "out_dir": "runs/full"},
}
OBJECTIVES = ("sft", "dpo")
DEFAULT_DATA = {"sft": "datasets/alpaca_en_demo.json", "dpo": "datasets/dpo_en_demo.jsonl"}
RESUMABLE = ("max_steps", "eval_interval", "eval_batches", "ckpt_interval", "report_to", "logging_dir", "wandb_project", "run_name")
"""Options a resumed run may change; every other one comes from the saved run, so it continues exactly."""
DEFAULT_INIT_TEXT = "Below is an instruction. Write a response that completes the request."


@dataclass(frozen=True)
class TrainConfig:
    """What a tuning run trains, on what, and how (see `python ft_main.py -h` for each option)."""

    model: LoadSpec = field(default_factory=lambda: LoadSpec(max_seq_len=256, max_batch_size=0))
    """The base model: directory, tokenizer, dtype, quantization, RoPE override; max_seq_len per example."""
    method: str = "prompt"
    """What trains: "prompt" (a soft prompt), "lora" (adapters in the parallel linears) or "full" (every weight)."""
    objective: str = "sft"
    """What it minimises: "sft" (the responses' token loss) or "dpo" (preference pairs, llama/tuning/dpo.py)."""
    dpo_loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    data: Path = Path("datasets/alpaca_en_demo.json")
    """Training records: alpaca-format (sft) or preference pairs (dpo), a JSON list or JSONL."""
    val_data: Optional[Path] = None
    """An explicit held-out file (instead of --val_fraction of --data)."""
    template: str = "alpaca"
    field_map: Optional[dict[str, str]] = None
    """Our field names -> the file's."""
    train_on_inputs: bool = False
    val_fraction: float = 0.05
    max_examples: Optional[int] = None
    group_by_length: bool = False
    pack: bool = False
    n_virtual_tokens: int = 16
    init: str = "text"
    init_text: str = DEFAULT_INIT_TEXT
    lora_rank: int = 8
    """r, the rank of each adapter."""
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    checkpoint_activations: bool = False
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 0.03
    """Peak learning rate (the command line's default depends on the method: METHOD_DEFAULTS)."""
    min_lr: float = 0.003
    warmup_steps: int = 10
    lr_decay_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 25
    eval_batches: int = 0
    ckpt_interval: int = 50
    chunk_size: int = 256
    tp: Optional[int] = None
    """Tensor-parallel ranks per group (None: the whole world)."""
    seed: int = 0
    out_dir: Path = Path("runs/prompt_tuning")
    threads: Optional[int] = None
    report_to: tuple[str, ...] = ()
    """Trackers rank 0 logs every metrics.jsonl scalar to: tensorboard, wandb (llama/tuning/tracking.py)."""
    logging_dir: Optional[Path] = None
    """TensorBoard's folder (default <out_dir>/tensorboard)."""
    wandb_project: Optional[str] = None
    run_name: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "report_to", tuple(self.report_to))
        check(self)

    @property
    def dpo(self) -> DPOConfig:
        return DPOConfig(self.dpo_loss, self.beta, self.label_smoothing)


def check(config: TrainConfig) -> None:
    """Every value in range, one UserError for the first that is not (no side effects)."""
    if config.method not in METHOD_DEFAULTS:
        raise UserError(f"unknown --method '{config.method}': choose one of {', '.join(METHOD_DEFAULTS)}")
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "ckpt_interval", "chunk_size", "lora_rank", "n_virtual_tokens",
                 "tp", "max_examples", "threads"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if not (math.isfinite(config.lr) and 0 < config.lr <= 1):  # AdamW moves a weight by about lr a step
        raise UserError(f"--lr must be in (0, 1], got {config.lr}: e.g. 3e-3 for LoRA, 0.03 for a soft prompt")
    if not (math.isfinite(config.min_lr) and 0 <= config.min_lr <= 1):
        raise UserError(f"--min_lr must be in [0, 1], got {config.min_lr}")
    if not 0 <= config.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.pack and config.group_by_length:
        raise UserError("--pack and --group_by_length exclude each other: packing already fills rows with whole examples; drop one")
    if config.objective not in OBJECTIVES:
        raise UserError(f"unknown --objective '{config.objective}': choose one of {', '.join(OBJECTIVES)}")
    if config.objective == "dpo":
        config.dpo  # checks --dpo_loss, --beta, --label_smoothing
        if config.pack:
            raise UserError("--pack is for --objective sft: DPO batches keep each pair's chosen and rejected rows side by side; drop --pack")
    check_available(config.report_to)


def save(config: TrainConfig, out_dir: Path) -> Path:
    """Write run_config.json (readable: the options as the command line names them)."""
    return atomic_write_text(json.dumps(to_json(config), indent=2) + "\n", Path(out_dir) / CONFIG)


def load(out_dir: Path) -> TrainConfig:
    """run_config.json of the run in `out_dir`."""
    return from_json(TrainConfig, read_json(Path(out_dir) / CONFIG, "the run's options (written at its first checkpoint)"), str(Path(out_dir) / CONFIG))


def from_options(options: dict) -> TrainConfig:
    """A config from flat option values (a run saved before run_config.json: its `vars(args)`)."""
    model_fields = {f.name for f in fields(LoadSpec)}
    known = {f.name for f in fields(TrainConfig)}
    model = {k: v for k, v in options.items() if k in model_fields and k != "max_batch_size"}
    flat = {k: v for k, v in options.items() if k in known and k != "model"}
    if isinstance(flat.get("lora_targets"), str):
        flat["lora_targets"] = tuple(t.strip() for t in flat["lora_targets"].split(","))
    if isinstance(flat.get("field_map"), str):
        flat["field_map"] = dict(item.split("=", 1) for item in flat["field_map"].split(","))
    return from_json(TrainConfig, {**flat, "model": {**model, "max_batch_size": 0}}, "the run's saved options")


def option(config: TrainConfig, name: str):
    """The value of command-line option `name` in `config`."""
    return getattr(config.model, name) if name in {f.name for f in fields(LoadSpec)} else getattr(config, name)


def resumed(saved: TrainConfig, typed: dict[str, object], now: TrainConfig) -> TrainConfig:
    """The saved run's config with the options typed now that a resume may change (RESUMABLE);
    any other typed option whose value differs from the saved one is a UserError naming it."""
    for name in typed:
        if name not in RESUMABLE and option(now, name) != option(saved, name):
            raise UserError(f"--{name} {option(now, name)} differs from the saved run's {option(saved, name)}: a resumed run keeps its "
                            f"options (only {', '.join(RESUMABLE)} may change)")
    return replace(saved, **{name: getattr(now, name) for name in typed if name in RESUMABLE})
