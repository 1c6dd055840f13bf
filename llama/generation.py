"""Batched generation with the KV cache: greedy or temperature + top-p, stop at EOS, streaming.

The hot path is three small functions: `prefill` (the prompt in one forward), `decode_one_token`
and `sample`. Every tensor-parallel rank runs the same loop on the same tokens; sampling draws
from a generator seeded identically on every rank, so all ranks pick the same token.
"""

from pathlib import Path
from typing import Iterator, Optional

import torch

from llama import chat, distributed
from llama import quantize as quant
from llama.chat import Message
from llama.cli import parse_dtype, resolve_dtype, say_compiling
from llama.errors import UserError
from llama.formats import model_format
from llama.formats.load import load_model
from llama.model import Transformer
from llama.sampling import Sampling, sample
from llama.tokenizer import Tokenizer, find_tokenizer, load_tokenizer


def prefill(model: Transformer, tokens: torch.Tensor, prefix: Optional[torch.Tensor], all_logits: bool) -> torch.Tensor:
    """Run the prompt (after an optional soft-prompt prefix) through the model from position 0.

    Returns logits of the last position only, unless all_logits (echo with logprobs).
    """
    hidden = model.hidden_states(tokens, 0, prefix)
    return model.output(hidden if all_logits else hidden[:, -1:]).float()


def decode_one_token(model: Transformer, tokens: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
    """Logits [B, 1, V] for tokens [B, 1] at position start_pos, appending to the KV cache.

    A position tensor takes the static-shape path (`Transformer.decode_hidden`) that
    torch.compile turns into one graph (a CUDA graph on GPUs).
    """
    if isinstance(start_pos, torch.Tensor):
        return model.output(model.decode_hidden(tokens, start_pos)).float()
    return model.output(model.hidden_states(tokens, start_pos)).float()


def first_stop(ids: list[int], start: int, stop_ids: frozenset[int]) -> int:
    """Index of the first stop token in ids[start:] (len(ids) if none): where a completion ends."""
    return next((i for i in range(start, len(ids)) if ids[i] in stop_ids), len(ids))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor, top_k: int = 0) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Logprobs [T-1] of ids[1:] [T], each given the tokens before it, from the logits [T, V] of
    one forward over `ids`; with top_k, also the (values, ids) [T-1, k] of the k likeliest tokens
    at each of those positions. The one computation behind `Llama.score` and the server's echo."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    chosen = logprobs.gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)
    if top_k <= 0:
        return chosen, None
    top = logprobs.topk(top_k)
    return chosen, (top.values, top.indices)


class Llama:
    """A loaded model + tokenizer on this rank, with Meta's generation API."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, parallel: distributed.Parallel, seed: int = 1, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.parallel = parallel
        self.generator = torch.Generator(parallel.device).manual_seed(seed)
        # Stopping at EOS needs the device's answer on the host; a GPU is asked only every few
        # steps, so the host keeps queueing work (generate() cuts the rows at their first EOS).
        self.eos_check_every = 1 if parallel.device.type == "cpu" else 8
        self.compiled_step = None
        if compile:  # one specialisation per batch size; CUDA graphs remove the per-kernel launch cost
            say_compiling(True, parallel.is_main)
            mode = "reduce-overhead" if parallel.device.type == "cuda" else None
            self.compiled_step = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False)
            self.step_pos = torch.zeros(1, dtype=torch.long, device=parallel.device)

    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: Optional[str | Path] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        dtype: str = "auto",
        seed: int = 1,
        tp_size: Optional[int] = None,
        compile: bool = False,
        rope_scaling: Optional[dict] = None,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Load a model directory (Meta, any shard count, or Hugging Face) split over this job's tensor-parallel ranks.

        `rope_scaling` overrides Llama 3 RoPE scaling constants the checkpoint states (or Meta's defaults).
        `quantize` (none, int8, int4[-gG], nf4: llama/quantize.py) quantizes the seven linears of each
        block, each rank its own slice, while loading.
        """
        quant.check_compile(quant.parse_scheme(quantize), compile)  # bad values say so before any work
        ckpt_dir = Path(ckpt_dir)
        model_format(ckpt_dir)  # a missing or unfinished model directory says so before the tokenizer is sought
        torch_dtype = parse_dtype(resolve_dtype(dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
        tokenizer = load_tokenizer(find_tokenizer(ckpt_dir, tokenizer_path))
        parallel = distributed.setup(tp_size)
        torch.manual_seed(seed)
        model = load_model(
            ckpt_dir, tokenizer.n_words, max_seq_len, max_batch_size, torch_dtype, parallel.device, parallel.tp_rank, parallel.tp_size,
            quantize=quantize, **({"rope_scaling": rope_scaling} if rope_scaling else {}),
        )
        return Llama(model, tokenizer, parallel, seed, compile)

    def decode(self, tokens: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] of one decoding step, eager or through the compiled static-shape step.

        `start_pos` is one position for every row, or a [B] tensor of per-row positions (a
        server's batch, llama/serving/batching.py), which always takes the static-shape step.
        """
        if self.compiled_step is None:
            return decode_one_token(self.model, tokens, start_pos)
        pos = start_pos if isinstance(start_pos, torch.Tensor) else self.step_pos.fill_(start_pos)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        return self.compiled_step(self.model, tokens, pos)

    @torch.inference_mode()
    def score(self, token_seqs: list[list[int]]) -> list[list[Optional[float]]]:
        """Logprob of every token of each sequence given the tokens before it (None for the first:
        nothing precedes it), from one forward per batch of --max_batch_size sequences.

        What lm-evaluation-harness's loglikelihood needs, and what the server's `echo` returns.
        Every tensor-parallel rank calls it with the same sequences, as with `generate`.
        """
        self._check_ids(token_seqs)
        cache_rows = self.model.layers[0].attention.cache.k.size(0)
        order = sorted(range(len(token_seqs)), key=lambda i: len(token_seqs[i]))  # similar lengths share a batch
        scores: list[list[Optional[float]]] = [[] for _ in token_seqs]
        for start in range(0, len(order), cache_rows):
            batch = order[start : start + cache_rows]
            longest = max(len(token_seqs[i]) for i in batch)
            tokens = torch.zeros(len(batch), longest, dtype=torch.long, device=self.parallel.device)
            for row, i in enumerate(batch):  # padded at the end: a causal model's earlier positions never see it
                tokens[row, : len(token_seqs[i])] = torch.tensor(token_seqs[i], dtype=torch.long)
            logits = prefill(self.model, tokens, None, all_logits=True)
            for row, i in enumerate(batch):
                n = len(token_seqs[i])
                scores[i] = [None, *prompt_logprobs(logits[row, :n], tokens[row, :n])[0].tolist()]
        return scores

    def _check_ids(self, token_seqs: list[list[int]]) -> None:
        """Each sequence is 1..max_seq_len ids of this vocabulary, or a UserError says which is not."""
        vocab, room = self.model.args.vocab_size, self.model.max_seq_len
        for i, seq in enumerate(token_seqs):
            if not 0 < len(seq) <= room:
                raise UserError(f"sequence {i} has {len(seq)} tokens: give 1 to --max_seq_len {room}")
            if not all(0 <= t < vocab for t in seq):
                raise UserError(f"sequence {i} has ids outside the vocabulary [0, {vocab})")

    @torch.inference_mode()
    def generate_steps(
        self,
        prompt_tokens: list[list[int]],
        sampling: Sampling = Sampling(),
        prefix: Optional[torch.Tensor] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Iterator[tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
        """Yield (position, tokens [B, total_len], logprobs) after each new position is filled.

        Prompts may differ in length: all rows advance together from the shortest prompt, and a
        row still inside its prompt keeps its prompt token instead of the sampled one. `prefix`
        [P, dim] is a soft prompt placed before every row (it shifts cache positions by P).
        """
        model, n_rows, max_gen_len = self.model, len(prompt_tokens), sampling.max_new
        cache_rows = model.cache_rows
        if n_rows > cache_rows:
            raise UserError(f"{n_rows} prompts exceed --max_batch_size {cache_rows}")
        if max_gen_len < 1:
            raise UserError(f"max_gen_len must be at least 1, got {max_gen_len}")
        if min(len(p) for p in prompt_tokens) == 0:
            raise UserError("a prompt is empty: give at least one token (the BOS token counts)")
        n_prefix = 0 if prefix is None else prefix.size(0)
        room = model.max_seq_len - n_prefix
        longest, shortest = max(len(p) for p in prompt_tokens), min(len(p) for p in prompt_tokens)
        if longest >= room:
            raise UserError(f"prompt of {longest} tokens does not fit max_seq_len {room}: shorten it or raise --max_seq_len")
        total_len = min(room, max_gen_len + longest)
        device = self.parallel.device
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else self.tokenizer.eos_id
        tokens = torch.full((n_rows, total_len), pad, dtype=torch.long, device=device)
        is_prompt = torch.zeros_like(tokens, dtype=torch.bool)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
            is_prompt[row, : len(prompt)] = True
        token_lp = torch.zeros(n_rows, total_len, device=device) if logprobs else None
        finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(sorted(self.tokenizer.stop_ids), dtype=torch.long, device=device)
        batch_prefix = None if prefix is None else prefix.unsqueeze(0).expand(n_rows, -1, -1)
        generator = self.generator if sampling.seed is None else torch.Generator(device).manual_seed(sampling.seed)

        logits = prefill(model, tokens[:, :shortest], batch_prefix, all_logits=logprobs and echo)
        if logprobs and echo:
            token_lp[:, 1:shortest] = token_logprobs(logits[:, :-1], tokens[:, 1:shortest])
        for cur_pos in range(shortest, total_len):
            if cur_pos > shortest:
                logits = self.decode(next_token.unsqueeze(1), n_prefix + cur_pos - 1)
            next_token = sample(logits[:, -1], sampling.temperature, sampling.top_p, generator)
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_lp[:, cur_pos] = token_logprobs(logits[:, -1], next_token)
            finished |= ~is_prompt[:, cur_pos] & torch.isin(next_token, stop_ids)
            yield cur_pos, tokens, token_lp
            if (cur_pos - shortest + 1) % self.eos_check_every == 0 and finished.all():
                break

    def generate(
        self,
        prompt_tokens: list[list[int]],
        sampling: Sampling = Sampling(),
        logprobs: bool = False,
        echo: bool = False,
        prefix: Optional[torch.Tensor] = None,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Generated ids per prompt (with the prompt if echo), cut at the first stop token."""
        end, tokens, token_lp, max_gen_len = 0, None, None, sampling.max_new
        for end, tokens, token_lp in self.generate_steps(prompt_tokens, sampling, prefix, logprobs, echo):
            pass
        out_tokens, out_lp = [], []
        for row, prompt in enumerate(prompt_tokens):
            start, stop = (0 if echo else len(prompt)), min(end + 1, len(prompt) + max_gen_len)
            ids = tokens[row, start:stop].tolist()  # shorter prompts ran longer: cut to max_gen_len
            lps = token_lp[row, start:stop].tolist() if logprobs else []
            cut = first_stop(ids, len(prompt) - start, self.tokenizer.stop_ids)
            ids, lps = ids[:cut], lps[:cut]
            out_tokens.append(ids)
            out_lp.append(lps)
        return out_tokens, (out_lp if logprobs else None)

    def stream(
        self,
        prompt: list[int],
        sampling: Sampling = Sampling(),
        prefix: Optional[torch.Tensor] = None,
    ) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece as tokens are generated.

        Decoding the whole continuation each step and emitting the new suffix keeps multi-byte
        characters (byte-fallback tokens) whole.
        """
        shown = ""
        for pos, tokens, _ in self.generate_steps([prompt], sampling, prefix):
            ids = tokens[0, len(prompt) : pos + 1].tolist()
            if ids and ids[-1] in self.tokenizer.stop_ids:
                return
            text = self.decode_continuation(prompt, ids)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown) :]
                shown = text

    def decode_continuation(self, prompt: list[int], ids: list[int]) -> str:
        """Text of `ids` as it reads after `prompt`: decoding them with the last prompt token
        keeps the leading space SentencePiece drops at the start of a decode."""
        context = prompt[-1:]
        return self.tokenizer.decode(context + ids)[len(self.tokenizer.decode(context)) :]

    def text_completion(
        self,
        prompts: list[str],
        sampling: Sampling = Sampling(),
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[dict]:
        """Complete each prompt; returns {"prompt_ids", "ids", "text"} (+ "logprobs") per prompt."""
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        return self.complete(prompt_tokens, sampling, logprobs, echo)

    def chat_completion(
        self,
        dialogs: list[list[Message]],
        sampling: Sampling = Sampling(),
        logprobs: bool = False,
    ) -> list[dict]:
        """Answer each dialog with the next assistant message, in the model family's chat format."""
        prompt_tokens = [self.chat_tokens(dialog) for dialog in dialogs]
        return self.complete(prompt_tokens, sampling, logprobs, echo=False)

    def chat_tokens(self, dialog: list[Message]) -> list[int]:
        """The prompt for the dialog's next answer in the model family's chat format (llama/chat.py)."""
        return chat.dialog_tokens(self.tokenizer, dialog)

    def complete(
        self,
        prompt_tokens: list[list[int]],
        sampling: Sampling = Sampling(),
        logprobs: bool = False,
        echo: bool = False,
        prefix: Optional[torch.Tensor] = None,
    ) -> list[dict]:
        """Complete token prompts (after an optional soft prompt); {"prompt_ids", "ids", "text"} (+ "logprobs") each."""
        ids, lps = self.generate(prompt_tokens, sampling, logprobs, echo, prefix)
        results = []
        for row, prompt in enumerate(prompt_tokens):
            result = {"prompt_ids": prompt, "ids": ids[row], "text": self.decode_continuation([] if echo else prompt, ids[row])}
            if logprobs:
                result["logprobs"] = lps[row]
            results.append(result)
        return results
