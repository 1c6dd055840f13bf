"""llama-mp: a pure-PyTorch Llama with fairscale tensor parallelism (reshard, infer, serve, tune).

The core (model, parallel layers, kernels, LoRA inside the layers, tokenizers, chat templates,
sampling, the generation engine, configuration, process groups, files, shared CLI options) sits at
this level; each concern above it has a folder: `formats/` (checkpoint readers and writers,
conversion, adapter files, planner), `tuning/` (data, training loop, methods), `serving/` (HTTP
server). README "Layout" has the map.

`from llama import Llama` is the generation entry point (imported when first asked for, so that
`import llama.model` alone stays light).
"""


def __getattr__(name):
    if name == "Llama":
        from llama.generation import Llama

        return Llama
    raise AttributeError(f"module 'llama' has no attribute '{name}'")
