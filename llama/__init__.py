"""llama-mp: a pure-PyTorch Llama with fairscale tensor parallelism (reshard, infer, serve, tune).

The core (model, parallel linears, LoRA inside them, tokenizers, chat templates, sampling,
generation, process groups, files, shared CLI options) sits at this level; each concern above it
has a folder: `formats/` (checkpoint readers and writers, conversion, adapter files, planner),
`tuning/` (data, training loop, methods), `serving/` (HTTP server). README "Layout" has the map.

`from llama import Llama` is the generation entry point. Modules that moved into the folders are
still importable under their old names (`llama.checkpoint`, `llama.hf`, ...: see `MOVED`).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

# Old module path -> the module(s) that now hold its names (an old module split in several
# is rebuilt from all of them, in order).
MOVED = {
    "llama.checkpoint": ("llama.formats", "llama.formats.layout", "llama.formats.params", "llama.formats.checkpoint",
                         "llama.formats.meta", "llama.formats.load", "llama.files", "llama.cli"),
    "llama.hf": ("llama.formats.hf", "llama.formats.params"),
    "llama.reshard": ("llama.formats.convert", "llama.formats.checkpoint", "llama.formats.meta", "llama.files"),
    "llama.gguf_export": ("llama.formats.gguf",),
    "llama.peft_lora": ("llama.formats.peft",),
    "llama.plan": ("llama.formats.plan", "llama.files"),
    "llama.data": ("llama.tuning.data",),
    "llama.train": ("llama.tuning.train",),
    "llama.methods": ("llama.tuning.methods",),
    "llama.prompt_tuning": ("llama.tuning.prompt", "llama.files"),
    "llama.plot": ("llama.tuning.plot",),
    "llama.serve": ("llama.serving.app",),
    "llama.scheduler": ("llama.serving.scheduler",),
    "llama.batching": ("llama.serving.batching",),
    "llama.openai_api": ("llama.serving.openai_api",),
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as a module holding the public names of its new home(s)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        for source in MOVED[module.__name__]:
            new = importlib.import_module(source)
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})


sys.meta_path.append(_MovedFinder())


def __getattr__(name):
    if name == "Llama":
        from llama.generation import Llama

        return Llama
    if f"llama.{name}" in MOVED:
        return importlib.import_module(f"llama.{name}")
    raise AttributeError(f"module 'llama' has no attribute '{name}'")
