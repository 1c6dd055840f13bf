"""The one tensor-parallel plan: each layer class states its split dim (llama/parallel.py), and every
table derived from it equals what the files and the libraries we interoperate with expect.

- the checkpoint layout's split dims (llama/formats/layout.py) against a 2-shard Meta checkpoint that
  Meta's own llama code loads at model-parallel size 2 (tests/data/stories260K_mp2, see its SOURCE.md):
  a weight is split on the dim whose size halves from the 1-shard file, replicated if none does;
- the names and shapes (derived from the model built on the meta device) against the bundled Meta
  checkpoint and against transformers' LlamaForCausalLM through the HF name map;
- the LoRA targets and their factors' split dims against PEFT: every target's PEFT module exists in
  transformers' model as an nn.Linear, and the factor split follows the PEFT Megatron rule
  (column: A whole, B like W's rows; row: A like W's columns, B whole);
- the quantized targets: the block linears, which the planner and the loader count the same way.
"""

import pytest
import torch
from references import DATA, STORIES

from llama import lora
from llama.formats import hf, layout, params, plan
from llama.formats.load import quantize_targets
from llama.kernels.schemes import Scheme, weight_nbytes
from llama.model import ModelArgs
from llama.parallel import ColumnParallelLinear, RowParallelLinear

STORIES_ARGS = params.model_args(params.read_params(STORIES / "params.json"), 512)


def stored_split_dim(full: torch.Tensor, piece: torch.Tensor):
    """The dim a 2-way split halved, None if the piece is the whole tensor."""
    halved = [d for d in range(full.dim()) if piece.shape[d] * 2 == full.shape[d]]
    assert len(halved) <= 1 and all(piece.shape[d] == full.shape[d] for d in range(full.dim()) if d not in halved)
    return halved[0] if halved else None


def test_split_dims_are_what_a_meta_two_shard_checkpoint_holds():
    full = torch.load(STORIES / "consolidated.00.pth", weights_only=True, mmap=True)
    piece = torch.load(DATA / "stories260K_mp2" / "consolidated.00.pth", weights_only=True, mmap=True)
    assert set(full) == set(piece)
    for key in full:
        assert layout.split_dim(key) == stored_split_dim(full[key], piece[key]), key
    table = layout.split_table()
    assert table == {**table, "attention.wq.weight": 0, "attention.wo.weight": 1, "tok_embeddings.weight": 1, "norm.weight": None}


def test_the_llama3_layout_differs_only_in_the_embedding():
    """Meta's Llama 3 code splits the embedding on the vocabulary (VocabParallelEmbedding); nothing else moves."""
    llama2, llama3 = layout.split_table(False), layout.split_table(True)
    assert {k for k in llama2 if llama2[k] != llama3[k]} == {layout.EMBEDDING}
    assert (llama2[layout.EMBEDDING], llama3[layout.EMBEDDING]) == (1, 0)


def test_split_dims_come_from_the_layer_classes():
    """The table is read off the model: each parallel linear's weight is split on its class's dim."""
    model = layout.meta_model(STORIES_ARGS)
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            assert layout.split_dim(f"{name}.weight") == type(module).split_dim


def test_names_and_shapes_are_the_checkpoints_and_transformers():
    transformers = pytest.importorskip("transformers")
    shapes = layout.full_shapes(STORIES_ARGS)
    stored = torch.load(STORIES / "consolidated.00.pth", weights_only=True, mmap=True)
    assert shapes == {k: tuple(v.shape) for k, v in stored.items() if k not in layout.NOT_LOADED}
    assert list(shapes) == [k for k in stored if k not in layout.NOT_LOADED], "the model's order is Meta's file order"
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
                                      num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False)
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(config).state_dict()
    assert {hf.hf_name(k): v for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_lora_targets_are_the_parallel_linears_and_peft_finds_them():
    transformers = pytest.importorskip("transformers")
    assert lora.TARGETS == {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
                            "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3", "output": None}
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=1, num_attention_heads=8, vocab_size=512)
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(config)
    from llama.formats import peft

    for target, path in lora.TARGETS.items():
        key = f"layers.0.{path}.lora.A" if path else "output.lora.A"
        module = peft.peft_name(key).removeprefix(peft.PREFIX).removesuffix(".lora_A.weight")
        assert isinstance(theirs.get_submodule(module), torch.nn.Linear), (target, module)
    # PEFT's Megatron rule (peft/tuners/lora/tp_layer.py): a column-parallel base gets a replicated A and a
    # row-split B; a row-parallel base a column-split A and a replicated B
    assert lora.factor_split_dims(ColumnParallelLinear.split_dim) == (None, 0)
    assert lora.factor_split_dims(RowParallelLinear.split_dim) == (1, None)
    assert layout.lora_split_dims("layers.3.feed_forward.w2.weight") == (1, None)


@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", 32), Scheme("nf4")])
def test_quantized_targets_are_the_block_linears_and_the_head_and_the_planner_counts_them(scheme):
    """--quantize covers the seven block linears in its scheme and the output head in int8 (int8, int4;
    nf4 leaves it in the model dtype, as QLoRA does); the planner counts each in its own scheme."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4)
    targets = quantize_targets(layout.meta_model(args), scheme)
    blocks = {f"layers.{i}.{lora.TARGETS[t]}.weight": scheme for i in range(2) for t in lora.DEFAULT_TARGETS}
    assert targets == (blocks if scheme.name == "nf4" else {**blocks, "output.weight": Scheme("int8")})
    assert quantize_targets(layout.meta_model(args), None) == {}
    shapes = layout.full_shapes(args)
    expected = sum(weight_nbytes(targets[k], *shapes[k], 4) if k in targets else torch.Size(shapes[k]).numel() * 4 for k in shapes)
    assert plan.weight_bytes(args, 1, 4, scheme) == expected
