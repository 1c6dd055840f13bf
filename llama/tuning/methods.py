"""Fine-tuning methods: what ft_main.py's one loop trains, and how each method saves and resumes.

A method decides four things and nothing else: the model it loads (frozen in --dtype, or
float32 master weights), which parameters train (and which of them are split over the
tensor-parallel ranks, for the global gradient norm), the optimizer, and the files it writes.
The loop (ft_main.py) is the same for all three:

- `prompt`: a soft prompt before the tokens (llama/tuning/prompt.py); the model is frozen.
  Writes prompt.pt and peft/ (PEFT prompt tuning); state.pt holds the prompt and its optimizer.
- `lora`: low-rank adapters inside the parallel linears (llama/lora.py); the model is frozen.
  Writes adapter.pt (full tensors) and peft/ (PEFT LoRA), plus lora_optimizer.TT.pt per
  tensor-parallel rank for --resume.
- `full`: every weight trains on its own slices, float32 master weights; AdamW states sharded
  over the data-parallel group by torch's ZeroRedundancyOptimizer. Writes model/ (a Meta
  checkpoint: consolidated.TT.pth per TP rank, params.json, tokenizer, manifest.json) and
  optimizer.TT.DD.pt per rank for --resume.

Every file is written under a temporary name and renamed; state.pt (rank 0, last, after a
barrier) names the step, and every per-rank file carries the step it belongs to, so a resume
never mixes steps. Which bases a method may train over (a quantized one, say) is decided here.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from llama import lora
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
from llama.kernels.schemes import Scheme, scheme_name
from llama.model import Transformer
from llama.tokenizer import TOKENIZER
from llama.tuning import train
from llama.tuning.config import TrainConfig
from llama.tuning.prompt import SoftPrompt, init_prompt, save_peft_prompt, save_prompt


def check_training(method: str, scheme: Optional[Scheme]) -> None:
    """Full tuning needs float weights; adapters train over nf4 only (its matmul has a backward)."""
    if scheme is None:
        return
    if method == "full":
        raise UserError(f"--method full trains every weight, which a {scheme} base cannot hold: drop --quantize, "
                        "or train adapters over a quantized base with --method lora --quantize nf4 (QLoRA)")
    if scheme.name != "nf4":
        raise UserError(f"--quantize {scheme} is for inference (its kernel has no backward): train over a quantized base with --quantize nf4")


class Method:
    """The base: a frozen model in --dtype; subclasses add what trains."""

    name = ""
    prompt: Optional[SoftPrompt] = None
    """The soft prompt placed before the tokens (prompt tuning only)."""

    def __init__(self, config: TrainConfig, parallel: Parallel):
        self.config, self.parallel = config, parallel
        self.model: Optional[Transformer] = None

    def positions(self) -> int:
        """Positions the RoPE table needs."""
        return self.config.model.max_seq_len

    def load_model(self, tokenizer, ckpt_dir: Optional[Path] = None, dtype: Optional[torch.dtype] = None) -> Transformer:
        """This rank's slice of the model, frozen, with a RoPE table but no KV cache, in training mode
        (the parallel layers' collectives then carry gradients: llama/parallel.py)."""
        spec = replace(self.config.model, max_seq_len=self.positions(), max_batch_size=0)
        spec = replace(spec, ckpt_dir=ckpt_dir or spec.ckpt_dir, dtype=dtype or spec.dtype)
        parallel = self.parallel
        self.model = load_model(spec, vocab_size=tokenizer.n_words, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
        return self.model.train()

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
        return torch.optim.AdamW(self.trainable(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    @property
    def n_virtual_tokens(self) -> int:
        """Positions the method puts before every example (a soft prompt's rows)."""
        return 0 if self.prompt is None else self.prompt.n_virtual_tokens

    def accumulate(self, micro_batches, *, chunk_size: int, dp_group, autocast, scale) -> tuple[float, int]:
        """The loop's hook for a step: gradients of what this method trains over the micro-batches;
        (mean token loss, label tokens). The model (and a soft prompt, if any) stay inside the method."""
        return train.accumulate_gradients(self.model, self.prompt, micro_batches, chunk_size=chunk_size, dp_group=dp_group, autocast=autocast,
                                          scale=scale, params=self.trainable())

    def hidden_states(self, input_ids: torch.Tensor, tuned: bool = True) -> torch.Tensor:
        """Final-norm hidden states of a padded batch through the model with what this method trains, or
        (`tuned` False) without it: the reference model of DPO, when the method can switch itself off."""
        return train.batch_hidden_states(self.model, self.prompt if tuned else None, input_ids, None)

    reference_on_the_fly = True
    """The model without what trains is at hand (prompt, LoRA); else (full) DPO precomputes the reference."""

    def evaluate(self, batches, *, chunk_size: int, dp_group, autocast, tuned: bool = True) -> tuple[float, float]:
        """Held-out (mean token loss, perplexity) with what this method trains, or of the model alone (`tuned` False)."""
        return train.estimate_loss(self.model, self.prompt if tuned else None, batches, chunk_size=chunk_size, dp_group=dp_group, autocast=autocast)

    def shared_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """What rank 0 keeps in state.pt for this method."""
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

    def positions(self) -> int:
        return self.config.n_virtual_tokens + self.config.model.max_seq_len  # the prompt takes positions 0..P-1

    def build(self, tokenizer, resume_dir: Optional[Path]) -> Transformer:
        config = self.config
        model = self.load_model(tokenizer)
        self.prompt = init_prompt(model, tokenizer, n_virtual_tokens=config.n_virtual_tokens, init=config.init, init_text=config.init_text, seed=config.seed).to(self.parallel.device)
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
            config, model_args = self.config, self.model.args
            base = str(config.model.ckpt_dir)
            save_prompt(self.prompt, out_dir / "prompt.pt", {"base_model": base, "template": config.template, "step": step})
            save_peft_prompt(self.prompt, out_dir / "peft", base_model=base, tokenizer_path=str(config.model.tokenizer_path), n_layers=model_args.n_layers, n_heads=model_args.n_heads)

    def outputs(self, out_dir: Path) -> str:
        return f"prompt in {out_dir / 'prompt.pt'} and {out_dir / 'peft'}"


class LoRATuning(Method):
    name = "lora"
    resumed_step: Optional[int] = None

    def build(self, tokenizer, resume_dir: Optional[Path]) -> Transformer:
        config = self.config
        model = self.load_model(tokenizer)
        model.activation_checkpointing = config.checkpoint_activations
        targets = lora.parse_targets(list(config.lora_targets))
        if resume_dir is None:
            lora.add_lora(model, targets, r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout, seed=config.seed)
        else:
            full, saved = adapters.load_adapter(resume_dir / "adapter.pt")
            lora.load_state(model, full, saved["alpha"], config.lora_dropout)
            self.resumed_step = saved.get("step")
        return model.train()  # LoRA dropout is on in training

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(lora.local_state(self.model).items())

    def hidden_states(self, input_ids: torch.Tensor, tuned: bool = True) -> torch.Tensor:
        if tuned:
            return super().hidden_states(input_ids)
        lora.set_enabled(self.model, False)  # the base alone, bit for bit
        try:
            return super().hidden_states(input_ids)
        finally:
            lora.set_enabled(self.model, True)

    def restore(self, saved: dict, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
        check_layout(saved, self.parallel, tp_only=True)
        if self.resumed_step != saved["step"]:
            raise UserError(f"{out_dir / 'adapter.pt'} is from step {self.resumed_step} but state.pt from step {saved['step']}: "
                            "the run was killed while saving")
        state = _load_rank_file(out_dir / f"lora_optimizer.{self.parallel.tp_rank:02d}.pt", saved["step"])
        optimizer.load_state_dict(state["optimizer"])

    def adapter_config(self, step: int) -> dict:
        config = self.config
        return {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout, "targets": list(config.lora_targets),
                "base_model": str(config.model.ckpt_dir), "dim": self.model.args.dim, "n_layers": self.model.args.n_layers, "step": step,
                "base_quantization": scheme_name(config.model.quantize)}  # QLoRA: the adapter learned against this (e.g. nf4) base

    def save(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> None:
        full = lora.gather_state(self.model)  # a collective: every rank takes part
        if self.parallel.is_main:
            adapters.save_adapter(full, self.adapter_config(step), out_dir / "adapter.pt")
            peft.save_peft_lora(full, self.adapter_config(step), self.model.args, out_dir / "peft")
        if self.parallel.dp_rank == 0:  # data-parallel ranks hold the same optimizer state
            atomic_torch_save({"step": step, "optimizer": optimizer.state_dict()}, out_dir / f"lora_optimizer.{self.parallel.tp_rank:02d}.pt")

    def outputs(self, out_dir: Path) -> str:
        return f"adapter in {out_dir / 'adapter.pt'} and {out_dir / 'peft'}"


class FullTuning(Method):
    name = "full"

    def build(self, tokenizer, resume_dir: Optional[Path]) -> Transformer:
        # float32 master weights whatever --dtype says; on CUDA the loop's autocast computes in --dtype
        if self.parallel.device.type == "cuda" and self.parallel.is_main:
            warning = memory_warning(self.config, open_checkpoint(self.config.model.ckpt_dir).args, self.parallel,
                                     torch.cuda.mem_get_info(self.parallel.device)[1])
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        model = self.load_model(tokenizer, resume_dir / "model" if resume_dir else None, torch.float32)
        model.activation_checkpointing = self.config.checkpoint_activations
        return model.requires_grad_(True).train()

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    reference_on_the_fly = False  # the weights that train are the model: the reference is computed once, before training

    def optimizer(self, dp_group) -> torch.optim.Optimizer:
        """AdamW whose states are sharded over the data-parallel ranks (ZeRO stage 1)."""
        from torch.distributed.optim import ZeroRedundancyOptimizer  # imported here: it costs every script ~1.5 s to start (FSDP's imports)

        return ZeroRedundancyOptimizer(self.trainable(), optimizer_class=torch.optim.AdamW, process_group=dp_group,
                                       lr=self.config.lr, weight_decay=self.config.weight_decay)

    def _optimizer_file(self, out_dir: Path) -> Path:
        return out_dir / f"optimizer.{self.parallel.tp_rank:02d}.{self.parallel.dp_rank:02d}.pt"

    def restore(self, saved: dict, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
        check_layout(saved, self.parallel)
        manifest = read_json(out_dir / "model" / MANIFEST, "the run was killed before its first checkpoint was complete")
        if manifest.get("step") != saved["step"]:
            raise UserError(f"{out_dir / 'model'} holds step {manifest.get('step')} but state.pt step {saved['step']}: the run was killed while saving")
        optimizer.optim.load_state_dict(_load_rank_file(self._optimizer_file(out_dir), saved["step"])["optimizer"])

    def save(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> None:
        parallel, model_dir = self.parallel, out_dir / "model"
        if parallel.dp_rank == 0:  # one copy of each tensor-parallel slice
            state = {key: tensor.detach().to("cpu", copy=True) for key, tensor in self.model.state_dict().items()}
            atomic_torch_save(state, model_dir / shard_name(parallel.tp_rank))
        atomic_torch_save({"step": step, "optimizer": optimizer.optim.state_dict()}, self._optimizer_file(out_dir))
        dist.barrier()
        if parallel.is_main:
            write_meta_extras(self.config, model=self.model, model_dir=model_dir, step=step, n_shards=parallel.tp_size)

    def outputs(self, out_dir: Path) -> str:
        return f"Meta checkpoint in {out_dir / 'model'} (run it with example.py --ckpt_dir {out_dir / 'model'})"


METHODS = {method.name: method for method in (PromptTuning, LoRATuning, FullTuning)}


def make_method(config: TrainConfig, parallel: Parallel) -> Method:
    check_training(config.method, config.model.quantize)
    return METHODS[config.method](config, parallel)


def write_meta_extras(config: TrainConfig, *, model: Transformer, model_dir: Path, step: int, n_shards: int) -> None:
    """params.json (vocab filled in), the tokenizer and, last, manifest.json beside the shards."""
    base_params = config.model.ckpt_dir / PARAMS
    params = read_params(base_params) if base_params.is_file() else params_from_args(model.args)
    params["vocab_size"] = model.args.vocab_size
    atomic_write_text(json.dumps(params) + "\n", model_dir / PARAMS)
    atomic_copy(config.model.tokenizer_path, model_dir / TOKENIZER)
    names = [shard_name(i) for i in range(n_shards)] + [PARAMS, TOKENIZER]
    write_manifest(model_dir, manifest("meta", source=str(config.model.ckpt_dir), num_shards=n_shards, dtype="float32", files=[describe_file(model_dir / n) for n in names],
                                       method="full", step=step))


def memory_warning(config: TrainConfig, model_args, parallel: Parallel, card_bytes: int) -> Optional[str]:
    """The planner's per-card total for this full fine-tuning run, if it exceeds a card's memory."""
    dtype_bytes = (config.model.dtype or torch.bfloat16).itemsize
    need = plan.estimate(model_args, parallel.tp_size, plan.Workload("full", config.batch_size, config.model.max_seq_len, dtype_bytes,
                                                                       data_parallel=parallel.dp_size,
                                                                       checkpoint_activations=config.checkpoint_activations,
                                                                       objective=config.objective), overhead=0)
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
    """A per-rank resume file, checked to belong to state.pt's step."""
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing; resume with the same number of ranks (--tp and data-parallel size) as the run")
    state = load_file(path, mmap=False)
    if state.get("step") != step:
        raise UserError(f"{path} is from step {state.get('step')} but state.pt from step {step}: the run was killed while saving")
    return state

