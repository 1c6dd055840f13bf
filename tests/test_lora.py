"""LoRA on the bundled stories260K in one process (fp32, CPU), against references this project did not write.

- step 0: B = 0, so the logits are the base model's, bit for bit;
- HF PEFT: our exported adapter loaded by `PeftModel.from_pretrained` on a transformers Llama built
  from a config (with the base weights in HF's layout, permuted by transformers' own conversion
  formula) gives our logits; export -> import is the identity;
- merge: split_model.py --adapter writes base + alpha/r * B @ A, whose plain logits equal the
  adapted model's; the LoRA tensors' split dims follow the base weights' entries in the split table;
- bad input is one clear UserError: rank wider than a layer's slice, unknown target, adapter
  for another model (shapes), a PEFT adapter of another type, merge onto a different base.
"""

import json
import sys

import pytest
import torch
from references import REPO, STORIES

sys.path.insert(0, str(REPO))  # split_model.py lives at the repo root
import split_model  # noqa: E402
from llama import files  # noqa: E402
from llama import lora  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.errors import UserError  # noqa: E402
from llama.formats import layout  # noqa: E402
from llama.formats import load  # noqa: E402
from llama.formats import adapters  # noqa: E402
from llama.formats import peft as peft_lora  # noqa: E402
from llama.formats.convert import convert  # noqa: E402

ALL = list(lora.TARGETS)  # the seven block linears and the output
# Two implementations of the same fp32 forward (different op order: HF's rotate-half RoPE and eager
# attention vs our pair rotation and SDPA, the LoRA product added separately vs merged into W) differ
# by rounding only: fp32 eps 1.2e-7 relative per rounding, accumulated over 5 layers x ~8 reordered
# ops, ~40 roundings: 5e-6 of the largest logit. For the base model (|logits| <= ~20) that is the
# issue's 1e-4. A wrong row order or scale moves logits by > 0.1.
LOGITS_RTOL = 5e-6


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() < LOGITS_RTOL * b.abs().max())


def load_stories(ckpt_dir=STORIES):
    """A 1-rank fp32 model without KV cache (the plain forward, as training runs it)."""
    return load.load_model(LoadSpec(ckpt_dir, max_seq_len=64, max_batch_size=0, dtype=torch.float32), vocab_size=512, device=torch.device("cpu"))


@pytest.fixture
def model(world1):
    return load_stories()


def random_adapter(model, targets=ALL, rank=4, alpha=8.0, seed=0):
    """Adapters with both factors random (B = 0 would hide layout mistakes)."""
    lora.add_lora(model, targets, r=rank, alpha=alpha, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for adapter in lora.adapters(model).values():
        adapter.B.data = 0.1 * torch.randn(adapter.B.shape, generator=gen)
    return lora.gather_state(model)


def tokens(n=20, seed=0):
    return torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(seed))


def test_step_zero_gives_the_base_logits_exactly(model):
    ids = tokens()
    with torch.no_grad():
        base = model(ids)
    lora.add_lora(model, ALL, r=8, alpha=16.0)
    assert len(lora.local_state(model)) == 2 * (7 * 5 + 1)
    assert all(a.B.abs().max() == 0 and a.A.abs().max() > 0 for a in lora.adapters(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    assert torch.equal(model(ids), base)  # the autograd path too
    # PEFT's init: kaiming_uniform(a=sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in))
    A = lora.adapters(model)["layers.0.feed_forward.w2"].A
    assert A.abs().max() <= 172**-0.5 and A.abs().max() > 0.9 * 172**-0.5
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 72 and all(p.dtype == torch.float32 for p in trainable)


def test_split_dims_follow_the_base_table():
    for name, base in layout.split_table().items():
        a_dim, b_dim = layout.lora_split_dims(name)
        assert (a_dim, b_dim) == {0: (None, 0), 1: (1, None), None: (None, None)}[base], name
    assert layout.tensor_split_dim("layers.2.attention.wo.lora.A") == 1
    assert layout.tensor_split_dim("layers.2.attention.wo.lora.B") is None
    assert layout.tensor_split_dim("output.lora.B") == 0 and layout.tensor_split_dim("output.lora.A") is None


def hf_permute(w, n_heads, dim1, dim2):
    """transformers' convert_llama_weights_to_hf.py: Meta's q/k rows -> HF's rotate-half order."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_copy(args):
    """A transformers LlamaForCausalLM of the bundled model's shape holding its weights."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                                      num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps, max_position_embeddings=256,
                                      rope_theta=args.rope_theta, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(config).eval()
    meta = files.load_file(STORIES / "consolidated.00.pth")
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state = {"model.embed_tokens.weight": meta["tok_embeddings.weight"], "model.norm.weight": meta["norm.weight"],
             "lm_head.weight": meta["output.weight"]}
    q_out, kv_out = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    for i in range(args.n_layers):
        for ours, theirs in names.items():
            w = meta[f"layers.{i}.{ours}.weight"]
            if ours == "attention.wq":
                w = hf_permute(w, args.n_heads, q_out, args.dim)
            elif ours == "attention.wk":
                w = hf_permute(w, args.kv_heads, kv_out, args.dim)
            state[f"model.layers.{i}.{theirs}.weight"] = w
    hf.load_state_dict(state, strict=True)
    return hf


def test_peft_forward_with_our_exported_adapter_equals_ours(model, tmp_path):
    peft = pytest.importorskip("peft")
    ids = tokens(24)
    hf = hf_copy(model.args)
    with torch.no_grad():
        assert close(model(ids), hf(ids).logits)  # same base model
    full = random_adapter(model)
    config = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "base_model": str(STORIES)}
    peft_lora.save_peft_lora(full, config, model.args, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8.0
    assert saved["target_modules"] == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        ours, theirs = model(ids), peft_model(ids).logits
    assert close(ours, theirs)
    assert (ours - hf_copy(model.args)(ids).logits).abs().max() > 0.1  # the adapter matters
    back, back_config = adapters.load_adapter(tmp_path / "peft", model.args)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    assert back_config["rank"] == 4 and back_config["alpha"] == 8.0 and back_config["targets"] == ALL


def test_project_format_round_trip_and_merge(model, tmp_path):
    ids = tokens(16)
    full = random_adapter(model, targets=["wq", "wk", "wo", "w2", "output"])
    with torch.no_grad():
        adapted = model(ids)
    adapters.save_adapter(full, {"rank": 4, "alpha": 8.0, "targets": ["wq"]}, tmp_path / "adapter.pt")
    back, config = adapters.load_adapter(tmp_path / "adapter.pt")
    assert config["alpha"] == 8.0 and all(torch.equal(back[k], full[k]) for k in full)
    convert(STORIES, out_format="meta", num_shards=1, out_dir=tmp_path / "merged1", progress=False, adapter=tmp_path / "adapter.pt")
    split_model.main(["--ckpt_dir", str(STORIES), "--adapter", str(tmp_path / "adapter.pt"), "--num_shards", "2", "--out_dir", str(tmp_path / "merged2")])
    for n in (1, 2):
        out = tmp_path / f"merged{n}"
        merged = load_stories(out)
        with torch.no_grad():
            # merged W + s*B@A rounds once more per weight than the unmerged (W x + s*B(A x)) path
            assert close(merged(ids), adapted)
    shards = [files.load_file(tmp_path / "merged2" / f"consolidated.0{i}.pth") for i in range(2)]
    base = files.load_file(STORIES / "consolidated.00.pth")
    wo = torch.cat([s["layers.1.attention.wo.weight"] for s in shards], dim=1)
    expected = base["layers.1.attention.wo.weight"] + 2.0 * full["layers.1.attention.wo.lora.B"] @ full["layers.1.attention.wo.lora.A"]
    assert torch.allclose(wo, expected, rtol=0, atol=1e-6)  # fp32 rounding of |W| < 1 entries
    assert torch.equal(shards[0]["layers.1.ffn_norm.weight"], base["layers.1.ffn_norm.weight"])


def test_bad_input_is_one_clear_error(model, tmp_path):
    with pytest.raises(UserError, match=r"unknown LoRA target \['wz'\]: choose from wq, wk"):
        lora.parse_targets("wq,wz")
    with pytest.raises(UserError, match="--lora_rank 40 exceeds the 32 features 'layers.0.attention.wk' holds"):
        lora.add_lora(model, ["wk"], r=40, alpha=16.0)
    wide = {"layers.0.attention.wq.lora.A": torch.zeros(4, 128), "layers.0.attention.wq.lora.B": torch.zeros(64, 4)}
    with pytest.raises(UserError, match=r"LoRA for 'layers.0.attention.wq' has A \(4, 128\).*adapter is for another model"):
        lora.load_state(model, wide, 8.0)
    adapters.save_adapter(wide, {"rank": 4, "alpha": 8.0}, tmp_path / "wide.pt")
    with pytest.raises(UserError, match="the adapter's base model does not match"):
        convert(STORIES, out_format="meta", num_shards=1, out_dir=tmp_path / "merged", progress=False, adapter=tmp_path / "wide.pt")
    assert not (tmp_path / "merged").exists()
    (tmp_path / "prompt").mkdir()
    (tmp_path / "prompt" / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    with pytest.raises(UserError, match="is a PROMPT_TUNING adapter, not LORA"):
        adapters.load_adapter(tmp_path / "prompt", model.args)
    with pytest.raises(UserError, match="not a LoRA adapter written by ft_main.py"):
        torch.save({"weights": {}}, tmp_path / "other.pt")
        adapters.load_adapter(tmp_path / "other.pt")


def test_an_adapter_trained_with_peft_runs_here(model, tmp_path):
    """PEFT's own save_pretrained (q/k/v/o/gate/up/down, r=4, rsLoRA) loaded here gives PEFT's logits."""
    peft = pytest.importorskip("peft")
    ids = tokens(20, seed=3)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = peft.get_peft_model(hf_copy(model.args), config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # as if trained: B no longer zero
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))  # a change of the size training makes
        theirs = peft_model(ids).logits
        base = model(ids)
    peft_model.save_pretrained(tmp_path / "trained")
    full, config = adapters.load_adapter(tmp_path / "trained", model.args)
    assert config["rank"] == 4 and config["alpha"] == pytest.approx(8 * 2.0)  # rsLoRA: alpha / sqrt(r) == (alpha * sqrt(r)) / r
    lora.load_state(model, full, config["alpha"])
    with torch.no_grad():
        assert close(model(ids), theirs)
        assert (base - theirs).abs().max() > 0.1
