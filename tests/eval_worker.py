"""torchrun worker for test_eval.py: `Llama.score` on every rank of a tensor-parallel job.

    torchrun --nproc_per_node 2 tests/eval_worker.py '[[1, 403, 407], ...]'

Rank 0 prints the scores as one JSON line.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when not pip-installed
from llama import distributed  # noqa: E402
from llama.generation import Llama  # noqa: E402

if __name__ == "__main__":
    llm = Llama.build(Path(__file__).resolve().parent.parent / "ckpts" / "stories260K", max_seq_len=512, max_batch_size=2)
    try:
        scores = llm.score(json.loads(sys.argv[1]))  # 3 sequences on 2 cache rows: one waits for a row
        if llm.parallel.is_main:
            print(json.dumps(scores), flush=True)
    finally:
        distributed.teardown()
