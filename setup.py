from setuptools import find_packages, setup

setup(
    name="llama-mp",
    version="0.2.0",
    description="Pure-PyTorch Llama 1/2/3 with fairscale tensor parallelism: convert, reshard, infer, serve, tune",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "sentencepiece", "fairscale", "numpy", "tqdm", "tiktoken", "safetensors"],
    extras_require={
        "gguf": ["gguf>=0.10"],
        "serve": ["fastapi", "uvicorn"],
        "plot": ["matplotlib"],
        # HF exports' tokenizer.json (llama/formats/hf_tokenizer.py): a compiled wheel that pulls in huggingface-hub.
        "hf": ["tokenizers>=0.19"],
        "qlora": ["bitsandbytes"],  # --quantize nf4 (QLoRA); int8 / int4 need nothing beyond torch
        "track": ["tensorboard", "wandb"],  # ft_main.py --report_to tensorboard,wandb
        "bench": ["llama-cpp-python"],  # bench/decode.py compares with llama.cpp (compiles it from source: ~25 min on 2 cores)
        # transformers/peft/bitsandbytes/trl are reference implementations for the tests only; openai is the client the server is
        # tested with; lm-eval (with its API-model extra) evaluates through the server; import-linter checks the import contract;
        # tensorboard and wandb are read back by the tracking tests (offline); pytest-xdist runs the test files on two workers.
        "test": ["pytest", "pytest-xdist", "import-linter", "transformers>=4.45", "peft", "gguf>=0.10", "fastapi", "uvicorn", "openai", "httpx",
                 "tokenizers>=0.19", "lm-eval[api]>=0.4.9", "bitsandbytes", "trl", "tensorboard", "wandb"],
    },
)
