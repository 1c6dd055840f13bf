"""Kernels: how a linear's local product is computed, apart from what the model is.

- `schemes.py`: the weight formats as pure functions on tensors (quantize, dequantize, sizes);
  no modules, no devices, so the tests compare them with independent quantizers and the planner
  counts bytes with them.
- `linear.py`: one kernel module per scheme (int8, int4, nf4), holding one rank's slice in that
  format and multiplying by it; a parallel linear (llama/parallel.py) calls its `kernel` instead of
  F.linear; `linear_kernel` picks it when the weight is loaded.
- `packed.py`: kernels on a library's packed copy of a weight (one registry and custom op for
  torch.compile), and the float32 one of --prepack (oneDNN or MKL).

Which scheme a run may use (training, torch.compile) is decided where that policy lives:
llama/tuning/methods.py and llama/generation.py.
"""
