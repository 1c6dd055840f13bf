"""The soft prompt and the training-loop pieces, in one process on the bundled stories260K (fp32, CPU).

References: the model's own embedding table (inits), a plain full-vocabulary cross-entropy (the
chunked loss), one big batch (gradient accumulation), the written files read back (formats, the
training state and run_config.json), and the documented formulas (learning-rate schedule).
"""

import json
import math
import struct
import sys

import pytest
import torch
import torch.nn.functional as F
from references import STORIES, STORIES_TOKENIZER

from llama.config import LoadSpec
from llama.errors import UserError
from llama.formats import load
from llama.kernels.schemes import Scheme
from llama.tokenizer import load_tokenizer
from llama.tuning import config as run_config
from llama.tuning import data, train
from llama.tuning.config import TrainConfig
from llama.tuning.data import IGNORE_INDEX
from llama.tuning.prompt import SoftPrompt, init_prompt, load_prompt, save_peft_prompt, save_prompt

DATASET = STORIES.parent.parent / "datasets" / "alpaca_en_demo.json"


@pytest.fixture
def model(world1):
    spec = LoadSpec(STORIES, max_seq_len=64 + 16, max_batch_size=0, dtype=torch.float32)  # no KV cache, as training loads it
    return load.load_model(spec, vocab_size=512, device=torch.device("cpu")).train()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(STORIES_TOKENIZER)


def full_embeddings(model) -> torch.Tensor:
    return model.tok_embeddings.weight  # one rank: the whole [vocab, dim] table


def test_text_init_is_the_texts_token_embeddings_repeated(model, tokenizer):
    ids = tokenizer.encode("Tell a story.", bos=False, eos=False)
    prompt = init_prompt(model, tokenizer, n_virtual_tokens=2 * len(ids) + 1, init="text", init_text="Tell a story.")
    expected = full_embeddings(model)[(ids * 3)[: 2 * len(ids) + 1]]
    assert torch.equal(prompt.weight, expected)
    assert prompt.weight.dtype == torch.float32 and prompt.weight.requires_grad
    assert prompt(3).shape == (3, 2 * len(ids) + 1, 64)
    short = init_prompt(model, tokenizer, n_virtual_tokens=2, init="text", init_text="Tell a story.")
    assert torch.equal(short.weight, full_embeddings(model)[ids[:2]])


def test_vocab_and_random_inits(model, tokenizer):
    table = full_embeddings(model)
    vocab = init_prompt(model, tokenizer, n_virtual_tokens=12, init="vocab", seed=3)
    is_row = (vocab.weight[:, None, :] == table[None]).all(dim=-1)  # [12, vocab]
    assert is_row.any(dim=1).all()  # every row is exactly a row of the embedding table
    assert torch.equal(vocab.weight, init_prompt(model, tokenizer, n_virtual_tokens=12, init="vocab", seed=3).weight)
    assert not torch.equal(vocab.weight, init_prompt(model, tokenizer, n_virtual_tokens=12, init="vocab", seed=4).weight)
    noise = init_prompt(model, tokenizer, n_virtual_tokens=64, init="random", seed=3)
    assert not (noise.weight[:, None, :] == table[None]).all(dim=-1).any()  # not table rows
    assert 0.5 < noise.weight.std() / table.std() < 2  # the scale the first layer expects
    with pytest.raises(UserError, match="unknown prompt init 'zeros'"):
        init_prompt(model, tokenizer, n_virtual_tokens=4, init="zeros")
    with pytest.raises(UserError, match="--init_text is empty"):
        init_prompt(model, tokenizer, n_virtual_tokens=4, init="text", init_text="")


def test_chunked_cross_entropy_equals_full_cross_entropy(model):
    gen = torch.Generator().manual_seed(0)
    prompt = SoftPrompt(0.1 * torch.randn(5, 64, generator=gen))
    ids = torch.randint(0, 512, (3, 40), generator=gen)
    labels = ids.clone()
    labels[:, :11] = IGNORE_INDEX
    labels[1, 30:] = IGNORE_INDEX  # a padded row
    hidden = model.hidden_states(ids, prefix=prompt(3))
    logits = model.output(hidden).float()
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    (ref_grad,) = torch.autograd.grad(reference, prompt.weight)
    assert train.count_label_tokens(labels) == 2 * 29 + 19
    for chunk in (1, 7, 4096):
        loss = train.summed_loss(model, prompt, ids, labels, chunk_size=chunk)
        (grad,) = torch.autograd.grad(loss, prompt.weight)
        assert abs(loss.item() - reference.item()) < 1e-5 * reference.item()
        assert (grad - ref_grad).abs().max() < 1e-6 * ref_grad.abs().max()  # fp32 summation order only


def real_examples(tokenizer, n: int) -> list[data.Example]:
    """The first n bundled English records that keep a label token within 64 tokens (plain template)."""
    records = data.load_records(DATASET)[:40]
    examples = [data.tokenize(r, tokenizer, "plain", 64)[0] for r in records]
    return [e for e in examples if e is not None][:n]


def test_accumulation_equals_one_big_batch(model, tokenizer):
    """batch 4 x accum 1 == batch 2 x accum 2, with micro-batches holding different numbers of label tokens."""
    examples = real_examples(tokenizer, 4)
    pad = tokenizer.eos_id
    one = [data.collate(examples, pad)]
    two = [data.collate(examples[:2], pad), data.collate(examples[2:], pad)]
    counts = [train.count_label_tokens(labels) for _, labels in two]
    assert counts[0] != counts[1], counts  # unequal micro-batches: a mean of means would be wrong
    grads, losses = [], []
    for micro_batches in (one, two):
        prompt = init_prompt(model, tokenizer, n_virtual_tokens=6, init="vocab", seed=1)
        loss, n_labels = train.accumulate_gradients(model, prompt, micro_batches, chunk_size=50)
        assert n_labels == sum(counts)
        grads.append(prompt.weight.grad)
        losses.append(loss)
    assert (grads[0] - grads[1]).abs().max() < 1e-6
    assert abs(losses[0] - losses[1]) < 1e-6
    assert grads[0].abs().max() > 1e-4
    # the loss is the mean token loss of the whole step
    evaluated, _ = train.estimate_loss(model, init_prompt(model, tokenizer, n_virtual_tokens=6, init="vocab", seed=1), two, chunk_size=50)
    assert abs(evaluated - losses[0]) < 1e-6


def test_lr_schedule():
    lr = lambda step: train.get_lr(step, lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_project_and_peft_round_trips(model, tokenizer, tmp_path):
    prompt = init_prompt(model, tokenizer, n_virtual_tokens=7, init="text", init_text="Answer briefly.")
    prompt.weight.data += 0.01  # a "trained" prompt
    save_prompt(prompt, tmp_path / "prompt.pt")
    assert torch.equal(load_prompt(tmp_path / "prompt.pt", dim=64).weight, prompt.weight)

    save_peft_prompt(prompt, tmp_path / "peft", base_model="ckpts/stories260K", tokenizer_path=str(STORIES_TOKENIZER), n_layers=5, n_heads=8)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert config["num_virtual_tokens"] == 7 and config["token_dim"] == 64 and config["num_transformer_submodules"] == 1
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "Answer briefly."
    assert config["tokenizer_name_or_path"] == str(STORIES_TOKENIZER) and config["inference_mode"] is True
    assert config["num_layers"] == 5 and config["num_attention_heads"] == 8
    weights = torch.load(tmp_path / "peft" / "adapter_model.bin", weights_only=True)
    assert list(weights) == ["prompt_embeddings"]
    back = load_prompt(tmp_path / "peft", dim=64)
    assert torch.equal(back.weight, prompt.weight)
    assert back.config["init"] == "text" and back.config["init_text"] == "Answer briefly."
    assert not list(tmp_path.rglob(".*tmp"))


def test_peft_safetensors_import(tmp_path):
    """Recent PEFT writes adapter_model.safetensors; build one by the format's spec and read it back."""
    embeddings = torch.randn(3, 64).to(torch.bfloat16)
    raw = embeddings.view(torch.int16).numpy().tobytes()
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "prompt_embeddings": {"dtype": "BF16", "shape": [3, 64], "data_offsets": [0, len(raw)]}}).encode()
    (tmp_path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 64,
              "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    prompt = load_prompt(tmp_path, dim=64)
    assert torch.equal(prompt.weight, embeddings.float()) and prompt.config["init"] == "random"


def test_bad_adapters_are_clear_errors(tmp_path):
    save_prompt(SoftPrompt(torch.zeros(4, 32)), tmp_path / "narrow.pt")
    with pytest.raises(UserError, match=r"embedding dim 32 but the model has dim 64: use an adapter trained for this model"):
        load_prompt(tmp_path / "narrow.pt", dim=64)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(UserError, match="LORA adapter; only PEFT PROMPT_TUNING"):
        load_prompt(tmp_path / "lora")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a prompt file written by ft_main.py"):
        load_prompt(tmp_path / "other.pt")
    with pytest.raises(UserError, match="not found"):
        load_prompt(tmp_path / "missing.pt")


def test_training_state_round_trip_restores_everything(model, tokenizer, tmp_path):
    """state.pt (what prompt tuning keeps + schedule, step, data position, RNG) and run_config.json read back as written."""
    prompt = init_prompt(model, tokenizer, n_virtual_tokens=4, init="vocab")
    optimizer = torch.optim.AdamW([prompt.weight], lr=0.1)
    prompt.weight.grad = torch.ones_like(prompt.weight)
    optimizer.step()
    method_state = {"prompt": prompt.weight.detach().cpu().clone(), "prompt_config": prompt.config, "optimizer": optimizer.state_dict()}
    config = TrainConfig(model=LoadSpec(STORIES, max_seq_len=64, max_batch_size=0, dtype=torch.float32, quantize=Scheme("int4", 64)),
                         lr=0.1, lora_targets=("wq", "wv"), field_map={"instruction": "prompt"}, out_dir=tmp_path)
    run_config.save(config, tmp_path)
    train.save_training_state(tmp_path, method_state, schedule={"lr": 0.1}, step=7, data_position={"epoch": 1, "position": 5})
    after_save = (torch.rand(3), torch.randint(0, 10**9, ()).item())
    saved = train.load_training_state(tmp_path)
    assert saved["step"] == 7 and saved["data"] == {"epoch": 1, "position": 5} and saved["scheduler"] == {"lr": 0.1}
    assert run_config.load(tmp_path) == config
    written = json.loads((tmp_path / "run_config.json").read_text())  # readable: the options as the command line spells them
    assert written["lr"] == 0.1 and written["model"]["quantize"] == "int4-g64" and written["model"]["dtype"] == "float32"
    assert torch.equal(saved["prompt"], prompt.weight.detach())
    restored = torch.optim.AdamW([torch.nn.Parameter(saved["prompt"].clone())], lr=0.1)
    restored.load_state_dict(saved["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])
    train.set_rng_state(saved["rng"])
    assert torch.equal(torch.rand(3), after_save[0]) and torch.randint(0, 10**9, ()).item() == after_save[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json", "state.pt"]  # no temporary file left
    with pytest.raises(UserError, match="no training state at"):
        train.load_training_state(tmp_path / "none")


def test_metrics_log_drops_records_after_the_resumed_step(tmp_path):
    log = train.MetricsLog(tmp_path / "m.jsonl")
    for record in ({"step": 0, "eval_loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0},
                   {"step": 2, "eval_loss": 3.5}, {"step": 3, "loss": 2.0}):
        log.write(record)
    train.MetricsLog(tmp_path / "m.jsonl", resume_step=2)
    assert train.read_metrics(tmp_path / "m.jsonl") == [{"step": 0, "eval_loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}]


@pytest.mark.slow
def test_plot(tmp_path, monkeypatch):
    from llama.tuning import plot

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "eval_loss": 4.0, "eval_ppl": math.exp(4.0), "eval_loss_untuned": 4.0},
        {"step": 1, "loss": 3.9, "lr": 0.01}, {"step": 2, "loss": 3.7, "lr": 0.02},
        {"step": 2, "eval_loss": 3.8, "eval_ppl": math.exp(3.8), "eval_loss_untuned": 4.0}]))
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
        with pytest.raises(UserError, match="plotting needs matplotlib, an optional extra: pip install matplotlib"):
            plot.main([str(metrics)])
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        (tmp_path / "bad.jsonl").write_text('{"step": 0, "loss": 1}\n{oops\n')
        plot.main([str(tmp_path / "bad.jsonl")])
    pytest.importorskip("matplotlib")
    plot.main([str(metrics), "--out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
