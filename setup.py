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
        "qlora": ["bitsandbytes"],  # --quantize nf4 (QLoRA); int8 / int4 need nothing beyond torch
        # transformers/peft are reference implementations for the tests only; openai is the client the server is tested with.
        "test": ["pytest", "transformers>=4.45", "peft", "gguf>=0.10", "fastapi", "uvicorn", "openai", "httpx", "bitsandbytes"],
    },
)
