"""`Llama`: a model + tokenizer on this rank, loaded from any checkpoint, with Meta's generation API.

Every call is a client of the one engine (llama/engine.py): prompts become requests, the engine
steps until they are done. More prompts than `max_batch_size` (rows of the KV cache) wait for a
free row, and each prompt's result is what it would be alone. Under torchrun every rank makes the
same calls and gets the same results (greedy, or sampled from generators seeded alike).
"""

from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import torch

from llama import chat, distributed
from llama.chat import Message
from llama.cli import say_compiling
from llama.config import LoadSpec
from llama.engine import Completion, Engine, Piece, Request
from llama.errors import UserError
from llama.formats import model_format
from llama.formats.load import load_model
from llama.kernels.schemes import Scheme
from llama.model import Transformer
from llama.sampling import Sampling
from llama.tokenizer import Tokenizer, find_tokenizer, load_tokenizer


def check_compile(scheme: Optional[Scheme], compile: bool) -> None:
    """torch.compile traces the int kernels (aten ops) but not bitsandbytes' NF4 calls."""
    if compile and scheme is not None and scheme.name == "nf4":
        raise UserError("--compile does not support --quantize nf4 (torch.compile cannot trace bitsandbytes' calls): "
                        "drop --compile, or use --quantize int8 / int4")


class Llama:
    """A loaded model + tokenizer on this rank, generating through the engine."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, parallel: distributed.Parallel, *, seed: int = 1, compile: bool = False):
        self.model, self.tokenizer, self.parallel = model, tokenizer, parallel
        say_compiling(compile, parallel.is_main)
        self.engine = Engine(model, tokenizer, parallel.device, seed=seed, compile=compile)

    @staticmethod
    def build(spec: LoadSpec | str | Path, *, seed: int = 1, tp_size: Optional[int] = None, compile: bool = False, **fields) -> "Llama":
        """Load a model directory (Meta, any shard count, or Hugging Face) split over this job's tensor-parallel ranks,
        for inference: wq|wk|wv and w1|w3 each run as one product (llama.formats.load, inference=True).

        `spec` is a LoadSpec, or a model directory whose LoadSpec `fields` complete
        (`Llama.build("ckpts/stories260K", max_seq_len=128, quantize=Scheme("int8"))`).
        """
        spec = spec if isinstance(spec, LoadSpec) else LoadSpec(Path(spec), **fields)
        if fields and spec.ckpt_dir != fields.get("ckpt_dir", spec.ckpt_dir):
            raise ValueError("pass a LoadSpec or a directory with fields, not both")
        check_compile(spec.quantize, compile)  # before any work
        model_format(spec.ckpt_dir)  # a missing or unfinished model directory says so before the tokenizer is sought
        tokenizer = load_tokenizer(find_tokenizer(spec.ckpt_dir, spec.tokenizer_path))
        parallel = distributed.setup(tp_size)
        torch.manual_seed(seed)
        model = load_model(spec, vocab_size=tokenizer.n_words, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size,
                           inference=True)
        return Llama(model, tokenizer, parallel, seed=seed, compile=compile)

    def generate(self, prompts: list[list[int]], sampling: Sampling = Sampling(), *, prefix: Optional[torch.Tensor] = None) -> list[Completion]:
        """Complete token prompts (after an optional soft prompt [P, dim]); one Completion each, in order."""
        return self.engine.generate([Request(p, sampling, prefix) for p in prompts])

    def stream(self, prompts: list[list[int]], sampling: Sampling = Sampling(), *,
               prefix: Optional[torch.Tensor] = None) -> Iterator[tuple[int, Piece]]:
        """(prompt index, piece of text) as the steps produce them; all prompts run together (those beyond
        the cache's rows wait for one). A piece with a finish_reason is a prompt's last. The prompts
        are checked now, before the first piece is asked for."""
        out: list[tuple[int, Piece]] = []
        requests = [Request(p, sampling, prefix, on_piece=partial(lambda i, piece: out.append((i, piece)), i)) for i, p in enumerate(prompts)]
        self.engine.add(requests)
        return self._pieces(requests, out)

    def _pieces(self, requests: list[Request], out: list[tuple[int, Piece]]) -> Iterator[tuple[int, Piece]]:
        try:
            while any(r.finish_reason is None for r in requests):
                self.engine.step()
                yield from out
                out.clear()
        finally:  # the caller stopped early or a step failed: free the rows
            for request in requests:
                if request.finish_reason is None:
                    self.engine.scheduler.cancel(request)

    def text_completion(self, prompts: list[str], sampling: Sampling = Sampling()) -> list[Completion]:
        """Complete each text prompt (BOS added)."""
        return self.generate([self.tokenizer.encode(p, bos=True, eos=False) for p in prompts], sampling)

    def chat_completion(self, dialogs: list[list[Message]], sampling: Sampling = Sampling()) -> list[Completion]:
        """Answer each dialog with the next assistant message, in the model family's chat format."""
        return self.generate([self.chat_tokens(dialog) for dialog in dialogs], sampling)

    def chat_tokens(self, dialog: list[Message]) -> list[int]:
        """The prompt for the dialog's next answer in the model family's chat format (llama/chat.py)."""
        return chat.dialog_tokens(self.tokenizer, dialog)

    def score(self, token_seqs: list[list[int]]) -> list[list[Optional[float]]]:
        """Logprob of every token of each sequence given the tokens before it (None for the first:
        nothing precedes it), from one forward per sequence.

        What lm-evaluation-harness's loglikelihood needs, and what the server's `echo` returns.
        Every tensor-parallel rank calls it with the same sequences, as with `generate`.
        """
        scoring = Sampling(max_tokens=0, echo=True, top_logprobs=0)
        done = self.engine.generate([Request(seq, scoring) for seq in token_seqs])
        return [[lp.logprob for lp in c.prompt_logprobs] for c in done]

