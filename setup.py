from setuptools import find_packages, setup

setup(
    name="llama-mp",
    version="0.1.0",
    description="Pure-PyTorch Llama 1/2 with fairscale tensor parallelism: reshard, infer, prompt-tune",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "sentencepiece", "fairscale", "numpy", "tqdm"],
    extras_require={"test": ["pytest"], "plot": ["matplotlib"]},
)
