"""llama-mp: a pure-PyTorch Llama with fairscale tensor parallelism (reshard, infer, serve, tune)."""
