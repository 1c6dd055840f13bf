"""Fine-tuning methods: what ft_main.py's one loop trains, and how each method saves and resumes.

A method decides four things and nothing else: the model it loads (frozen in --dtype, or
float32 master weights), which parameters train (and which of them are split over the
tensor-parallel ranks, for the global gradient norm), the optimizer, and the files it writes.
The loop (ft_main.py) is the same for all three:

- `prompt`: a soft prompt before the tokens (llama/tuning/prompt.py); the model is frozen.
  Writes prompt.pt and peft/ (PEFT prompt tuning); ckpt.pt holds the prompt and its optimizer.
- `lora`: low-rank adapters inside the parallel linears (llama/lora.py); the model is frozen.
  Writes adapter.pt (full tensors) and peft/ (PEFT LoRA), plus lora_optimizer.TT.pt per
  tensor-parallel rank for --resume.
- `full`: every weight trains on its own slices, float32 master weights; AdamW states sharded
  over the data-parallel group by torch's ZeroRedundancyOptimizer. Writes model/ (a Meta
  checkpoint: consolidated.TT.pth per TP rank, params.json, tokenizer, manifest.json) and
  optimizer.TT.DD.pt per rank for --resume.

Every file is written under a temporary name and renamed; ckpt.pt (rank 0, last, after a
barrier) names the step, and every per-rank file carries the step it belongs to, so a resume
never mixes steps.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from llama import lora
from llama.cli import parse_dtype, rope_override
from llama.distributed import Parallel
from llama.errors import UserError
from llama.files import (
    MANIFEST,
    GiB,
    atomic_copy,
    atomic_torch_save,
    atomic_write_text,
    describe_file,
    load_file,
    manifest,
    read_json,
    write_manifest,
)
from llama.formats import adapters, open_checkpoint, peft, plan
from llama.formats.layout import shard_name, tensor_split_dim
from llama.formats.load import load_model
from llama.formats.params import PARAMS, params_from_args, read_params
from llama.model import Transformer
from llama.tokenizer import TOKENIZER
from llama.tuning import train
from llama.tuning.prompt import SoftPrompt, export_peft, init_prompt, save_prompt


class Method:
    """The base: a frozen model in --dtype; subclasses add what trains."""

    name = ""
    defaults: dict = {}
    """Option defaults that suit the method (learning rate, output directory)."""
    prompt: Optional[SoftPrompt] = None
    """The soft prompt placed before the tokens (prompt tuning only)."""

    def __init__(self, args: argparse.Namespace, parallel: Parallel):
        self.args, self.parallel = args, parallel
        self.model: Optional[Transformer] = None

    def positions(self) -> int:
        """Positions the RoPE table needs."""
        return self.args.max_seq_len

    def load_model(self, tokenizer, ckpt_dir: Optional[Path] = None, dtype: Optional[torch.dtype] = None) -> Transformer:
        """This rank's slice of the model, frozen, with a RoPE table but no KV cache."""
        args, parallel = self.args, self.parallel
        dtype = dtype or parse_dtype(args.dtype)
        self.model = load_model(Path(ckpt_dir or args.ckpt_dir), tokenizer.n_words, self.positions(), args.batch_size,
                                dtype, parallel.device, parallel.tp_rank, parallel.tp_size, kv_cache=False,
                                quantize=getattr(args, "quantize", "none"), **rope_overrides(args))
        return self.model

    def build(self, tokenizer, resume_dir: Optional[Path]) -> Transformer:
        """Load the model and create (or, with resume_dir, reload) what trains."""
        raise NotImplementedError

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        return [param for _, param in self.named_trainable()]

    def split(self) -> list[bool]:
        """For each trained tensor: is it split over the tensor-parallel ranks?"""
        return [tensor_split_dim(name) is not None for name, _ in self.named_trainable()]

    def optimizer(self, dp_group) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable(), lr=self.args.lr, weight_decay=self.args.weight_decay)

    @property
    def n_virtual_tokens(self) -> int:
        """Positions the method puts before every example (a soft prompt's rows)."""
        return 0 if self.prompt is None else self.prompt.n_virtual_tokens

    def accumulate(self, micro_batches, chunk_size: int, dp_group, autocast, scale) -> tuple[float, int]:
        """The loop's hook for a step: gradients of what this method trains over the micro-batches;
        (mean token loss, label tokens). The model (and a soft prompt, if any) stay inside the method."""
        return train.accumulate_gradients(self.model, self.prompt, micro_batches, chunk_size, dp_group, autocast, scale, self.trainable())

    def evaluate(self, batches, chunk_size: int, dp_group, autocast, tuned: bool = True) -> tuple[float, float]:
        """Held-out (mean token loss, perplexity) with what this method trains, or of the model alone (`tuned` False)."""
        return train.estimate_loss(self.model, self.prompt if tuned else None, batches, chunk_size, dp_group, autocast)

    def shared_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """What rank 0 keeps in ckpt.pt for this method."""
        return {}

    def restore(self, saved: dict, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
        """Reload the optimizer (and anything not reloaded by build) from a checkpoint."""

    def save(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called on every rank at a checkpoint; each rank writes the files it owns."""

    def outputs(self, out_dir: Path) -> str:
        """Where the result went, for the final message."""
        return str(out_dir)


class PromptTuning(Method):
    name = "prompt"
    defaults = {"lr": 0.03, "out_dir": "runs/prompt_tuning"}

    def positions(self) -> int:
        return self.args.n_virtual_tokens + self.args.max_seq_len  # the prompt takes positions 0..P-1

    def build(self, tokenizer, resume_dir: Optional[Path]) -> Transformer:
        args = self.args
        model = self.load_model(tokenizer)
        self.prompt = init_prompt(model, tokenizer, args.n_virtual_tokens, args.init, args.init_text, args.seed).to(self.parallel.device)
        return model

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [("prompt", self.prompt.weight)]

    def split(self) -> list[bool]:
        return [False]  # every rank holds the whole prompt

    def shared_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return {"prompt": self.prompt.weight.detach().cpu().clone(), "prompt_config": self.prompt.config, "optimizer": optimizer.state_dict()}

    def restore(self, saved: dict, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
        self.prompt.weight.data.copy_(saved["prompt"])
        optimizer.load_state_dict(saved["optimizer"])

    def save(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.parallel.is_main:
            args, model_args = self.args, self.model.args
            save_prompt(self.prompt, out_dir / "prompt.pt", {"base_model": args.ckpt_dir, "template": args.template, "step": step})
            export_peft(self.prompt, out_dir / "peft", args.ckpt_dir, args.tokenizer_path, model_args.n_layers, model_args.n_heads)

    def outputs(self, out_dir: Path) -> str:
        return f"prompt in {out_dir / 'prompt.pt'} and {out_dir / 'peft'}"


class LoRATuning(Method):
    name = "lora"
    defaults = {"lr": 3e-3, "out_dir": "runs/lora"}
    resumed_step: Optional[int] = None

    def build(self, tokenizer, resume_dir: Optional[Path]) -> Transformer:
        args = self.args
        model = self.load_model(tokenizer)
        model.checkpoint_activations = args.checkpoint_activations
        targets = lora.parse_targets(args.lora_targets)
        if resume_dir is None:
            lora.add_lora(model, targets, args.lora_rank, args.lora_alpha, args.lora_dropout, args.seed)
        else:
            full, config = adapters.load_adapter(resume_dir / "adapter.pt")
            lora.load_state(model, full, config["alpha"], args.lora_dropout)
            self.resumed_step = config.get("step")
        return model.train()  # LoRA dropout is on in training

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(lora.local_state(self.model).items())

    def restore(self, saved: dict, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
        check_layout(saved, self.parallel, tp_only=True)
        if self.resumed_step != saved["step"]:
            raise UserError(f"{out_dir / 'adapter.pt'} is from step {self.resumed_step} but ckpt.pt from step {saved['step']}: "
                            "the run was killed while saving")
        state = _load_rank_file(out_dir / f"lora_optimizer.{self.parallel.tp_rank:02d}.pt", saved["step"])
        optimizer.load_state_dict(state["optimizer"])

    def config(self, step: int) -> dict:
        args = self.args
        return {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": lora.parse_targets(args.lora_targets),
                "base_model": args.ckpt_dir, "dim": self.model.args.dim, "n_layers": self.model.args.n_layers, "step": step,
                "base_quantization": self.model.quantization}  # QLoRA: the adapter learned against this (e.g. nf4) base

    def save(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> None:
        full = lora.gather_state(self.model)  # a collective: every rank takes part
        if self.parallel.is_main:
            adapters.save_adapter(full, self.config(step), out_dir / "adapter.pt")
            peft.export_peft(full, self.config(step), self.model.args, out_dir / "peft")
        if self.parallel.dp_rank == 0:  # data-parallel ranks hold the same optimizer state
            atomic_torch_save({"step": step, "optimizer": optimizer.state_dict()}, out_dir / f"lora_optimizer.{self.parallel.tp_rank:02d}.pt")

    def outputs(self, out_dir: Path) -> str:
        return f"adapter in {out_dir / 'adapter.pt'} and {out_dir / 'peft'}"


class FullTuning(Method):
    name = "full"
    defaults = {"lr": 1e-3, "out_dir": "runs/full"}

    def build(self, tokenizer, resume_dir: Optional[Path]) -> Transformer:
        # float32 master weights whatever --dtype says; on CUDA the loop's autocast computes in --dtype
        if self.parallel.device.type == "cuda" and self.parallel.is_main:
            warning = memory_warning(self.args, open_checkpoint(self.args.ckpt_dir).args, self.parallel,
                                     torch.cuda.mem_get_info(self.parallel.device)[1])
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        model = self.load_model(tokenizer, resume_dir / "model" if resume_dir else None, torch.float32)
        model.checkpoint_activations = self.args.checkpoint_activations
        return model.requires_grad_(True).train()

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    def optimizer(self, dp_group) -> torch.optim.Optimizer:
        """AdamW whose states are sharded over the data-parallel ranks (ZeRO stage 1)."""
        return ZeroRedundancyOptimizer(self.trainable(), optimizer_class=torch.optim.AdamW, process_group=dp_group,
                                       lr=self.args.lr, weight_decay=self.args.weight_decay)

    def _optimizer_file(self, out_dir: Path) -> Path:
        return out_dir / f"optimizer.{self.parallel.tp_rank:02d}.{self.parallel.dp_rank:02d}.pt"

    def restore(self, saved: dict, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
        check_layout(saved, self.parallel)
        manifest = read_json(out_dir / "model" / MANIFEST, "the run was killed before its first checkpoint was complete")
        if manifest.get("step") != saved["step"]:
            raise UserError(f"{out_dir / 'model'} holds step {manifest.get('step')} but ckpt.pt step {saved['step']}: the run was killed while saving")
        optimizer.optim.load_state_dict(_load_rank_file(self._optimizer_file(out_dir), saved["step"])["optimizer"])

    def save(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> None:
        parallel, model_dir = self.parallel, out_dir / "model"
        if parallel.dp_rank == 0:  # one copy of each tensor-parallel slice
            state = {key: tensor.detach().to("cpu", copy=True) for key, tensor in self.model.state_dict().items()}
            atomic_torch_save(state, model_dir / shard_name(parallel.tp_rank))
        atomic_torch_save({"step": step, "optimizer": optimizer.optim.state_dict()}, self._optimizer_file(out_dir))
        dist.barrier()
        if parallel.is_main:
            write_meta_extras(self.args, self.model, model_dir, step, parallel.tp_size)

    def outputs(self, out_dir: Path) -> str:
        return f"Meta checkpoint in {out_dir / 'model'} (run it with example.py --ckpt_dir {out_dir / 'model'})"


def rope_overrides(args: argparse.Namespace) -> dict:
    """--rope_scaling_factor as load_model's override (runs saved before the option existed have none)."""
    rope = rope_override(args) if getattr(args, "rope_scaling_factor", None) is not None else None
    return {"rope_scaling": rope} if rope else {}


METHODS = {method.name: method for method in (PromptTuning, LoRATuning, FullTuning)}


def make_method(args: argparse.Namespace, parallel: Parallel) -> Method:
    if args.method not in METHODS:
        raise UserError(f"unknown --method '{args.method}': choose one of {', '.join(METHODS)}")
    return METHODS[args.method](args, parallel)


def write_meta_extras(args: argparse.Namespace, model: Transformer, model_dir: Path, step: int, n_shards: int) -> None:
    """params.json (vocab filled in), the tokenizer and, last, manifest.json beside the shards."""
    base_params = Path(args.ckpt_dir) / PARAMS
    params = read_params(base_params) if base_params.is_file() else params_from_args(model.args)
    params["vocab_size"] = model.args.vocab_size
    atomic_write_text(json.dumps(params) + "\n", model_dir / PARAMS)
    atomic_copy(Path(args.tokenizer_path), model_dir / TOKENIZER)
    names = [shard_name(i) for i in range(n_shards)] + [PARAMS, TOKENIZER]
    write_manifest(model_dir, manifest("meta", str(args.ckpt_dir), n_shards, "float32", [describe_file(model_dir / n) for n in names],
                                       method="full", step=step))


def memory_warning(args: argparse.Namespace, model_args, parallel: Parallel, card_bytes: int) -> Optional[str]:
    """The planner's per-card total for this full fine-tuning run, if it exceeds a card's memory."""
    dtype_bytes = parse_dtype(args.dtype).itemsize
    need = plan.estimate(model_args, parallel.tp_size, args.batch_size, args.max_seq_len, dtype_bytes, "full", 0,
                         data_parallel=parallel.dp_size, checkpoint_activations=args.checkpoint_activations)
    if need.total <= card_bytes:
        return None
    return (f"the planner puts --method full at {need.total / GiB:.1f} GiB per card (weights {need.weights / GiB:.1f}, "
            f"gradients + AdamW {need.train_state / GiB:.1f}, activations {need.activations / GiB:.1f}) but a card has "
            f"{card_bytes / GiB:.1f} GiB: use more tensor- or data-parallel ranks, --checkpoint_activations, a smaller "
            "--batch_size, or --method lora (see split_model.py --plan --mode full)")


def check_layout(saved: dict, parallel: Parallel, tp_only: bool = False) -> None:
    """Optimizer states are saved per rank: a resumed run needs the run's tensor- (and data-) parallel sizes."""
    layout = saved.get("layout", {})
    if layout.get("tp", parallel.tp_size) != parallel.tp_size or (not tp_only and layout.get("dp", parallel.dp_size) != parallel.dp_size):
        raise UserError(f"--resume: the run used {layout.get('tp')} tensor-parallel x {layout.get('dp')} data-parallel ranks, this "
                        f"job has {parallel.tp_size} x {parallel.dp_size}: resume with the same layout (the saved result itself "
                        "loads on any number of ranks)")


def _load_rank_file(path: Path, step: int) -> dict:
    """A per-rank resume file, checked to belong to ckpt.pt's step."""
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing; resume with the same number of ranks (--tp and data-parallel size) as the run")
    state = load_file(path, mmap=False)
    if state.get("step") != step:
        raise UserError(f"{path} is from step {state.get('step')} but ckpt.pt from step {step}: the run was killed while saving")
    return state

