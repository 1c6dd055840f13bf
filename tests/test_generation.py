"""llama/generation.py on the bundled stories260K: llama2.c's greedy ids through Llama.generate
(alone and in a batch of different-length prompts), EOS, echo/logprobs vs a full forward, top-p
sampling, the Llama 2 chat template, streaming, and prompt-length errors."""

import pytest
import sentencepiece
import torch
from references import GOLDEN, LLAMA2_TOKENIZER, STORIES

from llama.errors import UserError
from llama.generation import Llama, sample
from llama.sampling import Sampling
from llama.tokenizer import load_tokenizer

ONCE = GOLDEN["greedy_prompt_once_upon_a_time"]
LILY = GOLDEN["greedy_prompt_lily_park"]
FROM_BOS = GOLDEN["greedy_bos_256"]["generated_ids"]


@pytest.fixture
def llm(world1) -> Llama:
    return Llama.build(STORIES, max_seq_len=512, max_batch_size=4, seed=1)


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> set[int]:
    """Meta's top-p set, written independently: the most likely tokens whose mass before them is <= top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    return set(order[mass_before <= top_p].tolist())


# --- greedy --------------------------------------------------------------------------------------

def test_greedy_matches_llama2c(llm: Llama):
    (from_bos,), _ = llm.generate([[1]], Sampling(max_new=256))
    assert from_bos == FROM_BOS
    (once,), _ = llm.generate([ONCE["prompt_ids"]], Sampling(max_new=ONCE["n_generated"]))
    assert once == ONCE["generated_ids"]


def test_batch_of_different_length_prompts_matches_llama2c(llm: Llama):
    """Rows start generating at different positions; each gets exactly max_gen_len new ids."""
    prompts = [[1], LILY["prompt_ids"], ONCE["prompt_ids"]]
    ids, _ = llm.generate(prompts, Sampling(max_new=LILY["n_generated"]))
    n = LILY["n_generated"]
    assert ids == [FROM_BOS[:n], LILY["generated_ids"], ONCE["generated_ids"][:n]]


def test_eos_stops_each_row(llm: Llama):
    """With EOS set to the id run.c emits 14th from BOS ('▁Lily'), that row stops before it, the
    Lily row (which emits it only at step 56) runs on, and a batch of finished rows stops early."""
    stop_id = FROM_BOS[13]
    assert FROM_BOS.index(stop_id) == 13 and stop_id not in LILY["generated_ids"][:40]
    llm.tokenizer.eos_id = stop_id
    ids, _ = llm.generate([[1], LILY["prompt_ids"]], Sampling(max_new=40))
    assert ids == [FROM_BOS[:13], LILY["generated_ids"][:40]]
    steps = list(llm.generate_steps([[1]], Sampling(max_new=100)))
    # Generation stops once every row has produced EOS: at once on CPU; a GPU checks every few steps.
    assert len(steps) == 14 if llm.parallel.device.type == "cpu" else 14 <= len(steps) <= 24
    assert "".join(llm.stream([1], Sampling(max_new=100))) == llm.tokenizer.decode(FROM_BOS[:13])


def test_eos_inside_the_prompt_does_not_stop(llm: Llama):
    """Multi-turn chat prompts contain EOS; only a generated EOS ends a row."""
    prompt = ONCE["prompt_ids"] + [llm.tokenizer.eos_id, llm.tokenizer.bos_id] + ONCE["prompt_ids"][1:]
    (ids,), _ = llm.generate([prompt], Sampling(max_new=10), echo=True)
    assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + 10


# --- logprobs ------------------------------------------------------------------------------------

def test_echo_logprobs_equal_a_full_forward(llm: Llama):
    prompts = [ONCE["prompt_ids"], LILY["prompt_ids"]]
    ids, lps = llm.generate(prompts, Sampling(max_new=12), logprobs=True, echo=True)
    new_ids, new_lps = llm.generate(prompts, Sampling(max_new=12), logprobs=True)
    for prompt, row, row_lp, new_row, new_lp in zip(prompts, ids, lps, new_ids, new_lps):
        assert row == prompt + new_row and len(row_lp) == len(row) == len(prompt) + 12
        assert row_lp[0] == 0.0, "the first token has no prediction (Meta reports 0)"
        with torch.inference_mode():
            logits = llm.model(torch.tensor([row], device=llm.parallel.device), 0)[0].cpu()
        expected = torch.log_softmax(logits, dim=-1)[:-1].gather(-1, torch.tensor(row[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(row_lp[1:]), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(new_lp), torch.tensor(row_lp[len(prompt) :]), rtol=0, atol=1e-5)
        greedy = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
        assert new_row == greedy, "greedy ids must be the argmax of the full forward"


# --- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "temperature,top_p,kept",
    [(1.0, 0.7, [0.625, 0.375]), (1.0, 0.85, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]), (0.5, 0.7, [0.25 / 0.34, 0.09 / 0.34])],
)
def test_sample_draws_from_the_renormalised_nucleus(temperature: float, top_p: float, kept: list[float]):
    """probs (0.5, 0.3, 0.15, 0.05): the nucleus is the smallest top set reaching top_p, after the
    temperature (T=0.5 squares the odds: 0.685, 0.247, ... so 0.7 keeps two)."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 4)
    draws = sample(logits, temperature, top_p, torch.Generator().manual_seed(0))
    freqs = torch.bincount(draws, minlength=4).double() / len(draws)
    assert freqs[len(kept) :].sum() == 0, "sampled outside the nucleus"
    torch.testing.assert_close(freqs[: len(kept)], torch.tensor(kept, dtype=torch.float64), rtol=0, atol=0.015)


def test_sample_at_temperature_zero_is_argmax():
    logits = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, 0.0, 0.9, torch.Generator()), logits.argmax(-1))


def test_top_p_generation_is_seeded_and_stays_in_the_nucleus(world1):
    temperature, top_p = 1.0, 0.5
    runs = {seed: Llama.build(STORIES, max_seq_len=128, max_batch_size=2, seed=seed) for seed in (3, 4)}
    prompts = [[1], ONCE["prompt_ids"]]
    ids = {seed: llm.generate(prompts, Sampling(max_new=40, temperature=temperature, top_p=top_p))[0] for seed, llm in runs.items()}
    again = Llama.build(STORIES, max_seq_len=128, max_batch_size=2, seed=3).generate(prompts, Sampling(max_new=40, temperature=temperature, top_p=top_p))[0]
    assert again == ids[3], "same seed, same ids"
    assert ids[3] != ids[4], "another seed should sample differently"
    assert ids[3] != [FROM_BOS[:40], ONCE["generated_ids"][:40]], "sampling should leave the greedy path"
    model = runs[3].model
    for prompt, row in zip(prompts, ids[3]):
        full = prompt + row
        with torch.inference_mode():
            logits = model(torch.tensor([full], device=runs[3].parallel.device), 0)[0].cpu()
        for pos in range(len(prompt), len(full)):
            assert full[pos] in nucleus(logits[pos - 1], temperature, top_p), f"position {pos} sampled outside the top-p nucleus"


# --- chat, streaming, text -----------------------------------------------------------------------

def test_chat_template_matches_meta_layout(world1):
    """Meta's Llama 2 chat layout, spelled out as literal text and encoded with sentencepiece
    directly: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]."""
    llm = Llama(None, load_tokenizer(LLAMA2_TOKENIZER), world1)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    dialog = [
        {"role": "system", "content": "Always answer in rhymes."},
        {"role": "user", "content": "  What is a llama? "},
        {"role": "assistant", "content": " A woolly beast. "},
        {"role": "user", "content": "Where does it live?\n"},
    ]
    # Meta strips each turn after joining system and first user message, so the inner spaces stay.
    turn1 = "[INST] <<SYS>>\nAlways answer in rhymes.\n<</SYS>>\n\n  What is a llama? [/INST] A woolly beast. "
    turn2 = "[INST] Where does it live? [/INST]"
    expected = [1] + sp.encode(turn1) + [2] + [1] + sp.encode(turn2)
    assert expected[:8] == [1, 518, 25580, 29962, 3532, 14816, 29903, 6778], "<s>[INST] <<SYS>> as in Meta's chat prompts"
    assert llm.chat_tokens(dialog) == expected
    assert llm.chat_tokens([{"role": "user", "content": "Hi"}]) == [1] + sp.encode("[INST] Hi [/INST]")
    bad_dialogs = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}],
        [],
    ]
    for bad in bad_dialogs:
        with pytest.raises(UserError, match="alternating"):
            llm.chat_tokens(bad)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_streamed_pieces_join_to_the_full_text(llm: Llama, temperature: float):
    prompt = ONCE["prompt_ids"]
    llm.generator.manual_seed(7)
    pieces = list(llm.stream(prompt, Sampling(max_new=60, temperature=temperature, top_p=0.9)))
    llm.generator.manual_seed(7)
    (result,) = llm.complete([prompt], Sampling(max_new=60, temperature=temperature, top_p=0.9))
    assert len(pieces) > 20, "text should arrive piece by piece"
    assert "".join(pieces) == result["text"]


def test_text_completion_matches_llama2c_text(llm: Llama):
    (result,) = llm.text_completion([ONCE["prompt"]], Sampling(max_new=40))
    assert result["prompt_ids"] == ONCE["prompt_ids"] and result["ids"] == ONCE["generated_ids"][:40]
    assert ONCE["text"].startswith(ONCE["prompt"] + result["text"]) and len(result["text"]) > 100


def test_prompt_length_and_batch_limits(world1):
    llm = Llama.build(STORIES, max_seq_len=32, max_batch_size=2)
    with pytest.raises(UserError, match="max_seq_len"):
        llm.generate([[1] * 32], Sampling(max_new=4))
    (ids,), _ = llm.generate([[1] * 31], Sampling(max_new=4))
    assert len(ids) == 1, "a prompt of max_seq_len - 1 tokens leaves room for one new token"
    with pytest.raises(UserError, match="max_batch_size"):
        llm.generate([[1]] * 3, Sampling(max_new=4))
    with pytest.raises(UserError, match="empty"):
        llm.generate([[1], []], Sampling(max_new=4))
    with pytest.raises(UserError, match="max_gen_len"):
        llm.generate([[1]], Sampling(max_new=0))
