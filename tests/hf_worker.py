"""torchrun worker for test_hf.py: load an HF folder and its Meta copy on this rank, counting reads.

    torchrun --nproc_per_node 2 tests/hf_worker.py --hf HF_DIR --meta META_DIR --tokens TOKENS.pt --out DIR

Every safetensors file llama/formats/hf.py opens is wrapped so that each tensor handed out through
`get_slice(name)[...]` is recorded (name, shape, bytes), and `get_tensor` (a whole tensor) too.
Each rank writes DIR/rank<R>.pt: the logits of both copies on TOKENS, both state dicts, and the
record. No transformers import here: the test process computes the reference.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when not pip-installed
from llama import distributed  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.formats import hf  # noqa: E402
from llama.formats import load  # noqa: E402


class RecordingSlice:
    """A safetensors slice whose every read is logged."""

    def __init__(self, part, name: str, log: list):
        self.part, self.name, self.log = part, name, log

    def get_shape(self):
        return self.part.get_shape()

    def get_dtype(self):
        return self.part.get_dtype()

    def __getitem__(self, index):
        tensor = self.part[index]
        self.log.append(("slice", self.name, tuple(tensor.shape), tensor.nbytes))
        return tensor


class RecordingFile:
    """A safe_open handle that hands out RecordingSlices and logs whole-tensor reads."""

    def __init__(self, handle, log: list):
        self.handle, self.log = handle, log

    def keys(self):
        return self.handle.keys()

    def get_slice(self, name: str) -> RecordingSlice:
        return RecordingSlice(self.handle.get_slice(name), name, self.log)

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self.handle.get_tensor(name)
        self.log.append(("tensor", name, tuple(tensor.shape), tensor.nbytes))
        return tensor


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--hf", "--meta", "--tokens", "--out"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    log: list = []
    real_open = hf.safe_open
    hf.safe_open = lambda *a, **k: RecordingFile(real_open(*a, **k), log)
    parallel = distributed.setup()
    tokens = torch.load(args.tokens, weights_only=True)
    result = {"reads": log}
    try:
        for name, ckpt_dir in (("hf", args.hf), ("meta", args.meta)):
            spec = LoadSpec(ckpt_dir, max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0], dtype=torch.float32)
            model = load.load_model(spec, vocab_size=None, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
            with torch.inference_mode():
                result[f"{name}_logits"] = model(tokens, 0)
            result[f"{name}_state"] = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("cache.k", "cache.v"))}
        torch.save(result, args.out / f"rank{parallel.tp_rank}.pt")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
