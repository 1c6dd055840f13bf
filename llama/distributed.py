"""Process groups: the same code runs under `torchrun --nproc_per_node N` and plain `python`.

World = tp_size x dp_size. Ranks 0..tp-1 form the first tensor-parallel group (fairscale's
layout), and ranks with the same tensor-parallel rank form a data-parallel group.
"""

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from llama.errors import UserError


@dataclass(frozen=True)
class Parallel:
    """Where this process sits: global rank, tensor-parallel and data-parallel coordinates."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only global rank 0 prints, writes files and shows progress bars."""
        return self.rank == 0

    @property
    def tp_group(self):
        """The ranks that hold the slices of one model (they all-reduce activations)."""
        return fs_init.get_model_parallel_group()

    @property
    def dp_group(self):
        """The ranks that hold the same slice and read different batches (they sum gradients)."""
        return fs_init.get_data_parallel_group()


def setup(tp_size: Optional[int] = None) -> Parallel:
    """Join (or create) the process group and fairscale's model-parallel groups.

    nccl on CUDA, gloo on CPU. tp_size defaults to the whole world (pure tensor parallelism).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tp_size = tp_size or world_size
    if world_size % tp_size != 0:
        raise UserError(f"world size {world_size} is not a multiple of --tp {tp_size}; launch tp x dp processes")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if world_size == 1 and "RANK" not in os.environ:  # plain `python`, whatever the shell exports (MASTER_ADDR...)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    if not fs_init.model_parallel_is_initialized():
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # fairscale prints its setup
            fs_init.initialize_model_parallel(tp_size)
    return Parallel(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=fs_init.get_model_parallel_rank(),
        tp_size=fs_init.get_model_parallel_world_size(),
        dp_rank=fs_init.get_data_parallel_rank(),
        dp_size=fs_init.get_data_parallel_world_size(),
        device=device,
    )


def broadcast_object(obj: object, device: torch.device) -> object:
    """Rank 0's `obj` on every rank (the others pass None): a server's step is a pickle of a few hundred bytes."""
    if dist.get_world_size() == 1:
        return obj  # one process: nothing to send (a tiny model's step is ~1 ms, pickling is not free)
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def teardown() -> None:
    """Destroy the groups so tests and scripts exit cleanly."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
