"""torchrun worker for test_compile.py: greedy ids of one checkpoint, eager and torch.compiled, at TP=world.

    torchrun --nproc_per_node 2 tests/compile_worker.py --ckpt DIR --tokenizer TOK --out FILE

Rank 0 saves {"eager": ids, "compiled": ids, "compiled_logprobs": ...} to FILE (every rank computes
them: tensor-parallel ranks run in lockstep).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when not pip-installed
from llama import distributed  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.formats import load  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.sampling import Sampling  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = [[1, 403, 407, 261, 378], [1, 317, 269]]
GEN_LEN = 12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    parallel = distributed.setup()
    tokenizer = load_tokenizer(args.tokenizer)
    spec = LoadSpec(args.ckpt, max_seq_len=32, max_batch_size=len(PROMPTS), dtype=torch.float32)
    model = load.load_model(spec, vocab_size=tokenizer.n_words, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size,
                            inference=True)  # as Llama.build loads
    eager = [c.ids for c in Llama(model, tokenizer, parallel).generate(PROMPTS, Sampling(max_tokens=GEN_LEN))]
    done = Llama(model, tokenizer, parallel, compile=True).generate(PROMPTS, Sampling(max_tokens=GEN_LEN, top_logprobs=0))
    compiled, logprobs = [c.ids for c in done], [[lp.logprob for lp in c.logprobs] for c in done]
    if parallel.is_main:
        torch.save({"eager": eager, "compiled": compiled, "compiled_logprobs": logprobs}, args.out)
    distributed.teardown()


if __name__ == "__main__":
    main()
