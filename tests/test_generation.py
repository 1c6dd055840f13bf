"""llama/generation.py and the engine under it (llama/engine.py) on the bundled stories260K:
llama2.c's greedy ids through Llama.generate (alone and in a batch of different-length prompts),
more prompts than cache rows (each as if alone), EOS, echo/logprobs vs a full forward, top-p
sampling, the Llama 2 chat template, streaming, and prompt-length errors."""

import pytest
import sentencepiece
import torch
from references import GOLDEN, LLAMA2_TOKENIZER, STORIES

from llama import chat
from llama.errors import UserError
from llama.generation import Llama
from llama.sampling import Sampling, sample
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

def ids(completions) -> list[list[int]]:
    return [c.ids for c in completions]


def test_greedy_matches_llama2c(llm: Llama):
    (from_bos,) = llm.generate([[1]], Sampling(max_tokens=256))
    assert from_bos.ids == FROM_BOS and from_bos.finish_reason == "length"
    (once,) = llm.generate([ONCE["prompt_ids"]], Sampling(max_tokens=ONCE["n_generated"]))
    assert once.ids == ONCE["generated_ids"]


def test_batch_of_different_length_prompts_matches_llama2c(llm: Llama):
    """Rows generate at their own positions; each gets exactly max_tokens new ids."""
    prompts = [[1], LILY["prompt_ids"], ONCE["prompt_ids"]]
    n = LILY["n_generated"]
    assert ids(llm.generate(prompts, Sampling(max_tokens=n))) == [FROM_BOS[:n], LILY["generated_ids"], ONCE["generated_ids"][:n]]


# Rows of one decode step and a row alone reorder float32 sums (the GEMM over 1 vs 4 rows, the
# attention over the longest row's cache with later positions masked): a stories260K logit (|logit| <
# ~20, sums of <= 512 terms over 5 layers) moves by well under 1e-4. Where the top-2 logits of a step
# are more than MARGIN apart the argmax cannot differ, so equal greedy ids are only asserted with
# every compared step's margin checked (from the run's own top-2 logprobs, whose difference is the
# logit difference); an actual near-tie fails the margin check instead of comparing ids by luck.
MARGIN = 1e-3


def assert_margins(completion) -> None:
    for step, lp in enumerate(completion.logprobs):
        (_, first), (_, second) = lp.top
        assert first - second > MARGIN, f"near-tie at step {step}: the ids could differ by summation order alone"


def test_more_prompts_than_rows_equal_each_alone(world1):
    """Seven prompts on 3 cache rows: the four that wait take rows as others finish; each prompt's
    ids equal generating it alone (greedy, and sampled with its own seed), its text too."""
    llm = Llama.build(STORIES, max_seq_len=128, max_batch_size=3)
    prompts = [[1], LILY["prompt_ids"], ONCE["prompt_ids"], [1, 403], LILY["prompt_ids"][:5], ONCE["prompt_ids"][:3], [1, 317, 269]]
    lengths = [20, 35, 9, 41, 16, 28, 12]
    for temperature in (0.0, 1.0):
        settings = [Sampling(max_tokens=n, temperature=temperature, seed=100 + i, top_logprobs=2) for i, n in enumerate(lengths)]
        together = llm.engine.generate([_request(p, s) for p, s in zip(prompts, settings)])
        assert llm.engine.scheduler.stats["max_rows_decoded"] == 3
        for prompt, setting, completion in zip(prompts, settings, together):
            (alone,) = llm.engine.generate([_request(prompt, setting)])
            if temperature == 0:
                assert_margins(alone)
            # a seeded draw compares a uniform with the cumulative probabilities: reordered sums move them by
            # ~1e-7, so a different draw has a chance of that order per step; the ids are equal unless that happens
            assert completion.ids == alone.ids and completion.text == alone.text
            assert len(completion.ids) == setting.max_tokens or completion.finish_reason == "stop"


def _request(prompt, sampling):
    from llama.engine import Request

    return Request(prompt, sampling)


def test_eos_stops_each_row(llm: Llama):
    """With EOS set to the id run.c emits 14th from BOS ('▁Lily'), that row stops before it and frees
    its row, the Lily row (which emits it only at step 56) runs on."""
    stop_id = FROM_BOS[13]
    assert FROM_BOS.index(stop_id) == 13 and stop_id not in LILY["generated_ids"][:40]
    llm.tokenizer.eos_id = stop_id
    first, second = llm.generate([[1], LILY["prompt_ids"]], Sampling(max_tokens=40))
    assert (first.ids, first.finish_reason) == (FROM_BOS[:13], "stop")
    assert (second.ids, second.finish_reason) == (LILY["generated_ids"][:40], "length")
    before = llm.engine.scheduler.stats["decode_steps"]
    pieces = [piece.text for _, piece in llm.stream([[1]], Sampling(max_tokens=100))]
    assert llm.engine.scheduler.stats["decode_steps"] - before == 13, "the prefill gives token 1; 13 decode steps reach the stop token"
    assert "".join(pieces) == llm.tokenizer.decode(FROM_BOS[:13])


def test_eos_inside_the_prompt_does_not_stop(llm: Llama):
    """Multi-turn chat prompts contain EOS; only a generated EOS ends a row."""
    prompt = ONCE["prompt_ids"] + [llm.tokenizer.eos_id, llm.tokenizer.bos_id] + ONCE["prompt_ids"][1:]
    (result,) = llm.generate([prompt], Sampling(max_tokens=10))
    assert len(result.ids) == 10 and result.finish_reason == "length"


# --- logprobs ------------------------------------------------------------------------------------

def test_echo_logprobs_equal_a_full_forward(llm: Llama):
    prompts = [ONCE["prompt_ids"], LILY["prompt_ids"]]
    echoed = llm.generate(prompts, Sampling(max_tokens=12, echo=True, top_logprobs=0))
    plain = llm.generate(prompts, Sampling(max_tokens=12, top_logprobs=0))
    for prompt, with_echo, new in zip(prompts, echoed, plain):
        row = prompt + with_echo.ids
        assert with_echo.ids == new.ids and len(with_echo.prompt_logprobs) == len(prompt) and len(new.logprobs) == 12
        assert with_echo.prompt_logprobs[0].logprob is None, "the first token has no prediction"
        with torch.inference_mode():
            logits = llm.model(torch.tensor([row], device=llm.parallel.device), 0)[0].cpu()
        expected = torch.log_softmax(logits, dim=-1)[:-1].gather(-1, torch.tensor(row[1:])[:, None])[:, 0]
        got = [lp.logprob for lp in with_echo.prompt_logprobs[1:] + with_echo.logprobs]
        torch.testing.assert_close(torch.tensor(got), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in new.logprobs]),
                                   torch.tensor([lp.logprob for lp in with_echo.logprobs]), rtol=0, atol=1e-5)
        greedy = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
        assert new.ids == greedy, "greedy ids must be the argmax of the full forward"


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
    settings = Sampling(max_tokens=40, temperature=temperature, top_p=top_p)
    ids = {seed: [c.ids for c in llm.generate(prompts, settings)] for seed, llm in runs.items()}
    again = [c.ids for c in Llama.build(STORIES, max_seq_len=128, max_batch_size=2, seed=3).generate(prompts, settings)]
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

def test_chat_template_matches_meta_layout():
    """Meta's Llama 2 chat layout, spelled out as literal text and encoded with sentencepiece
    directly: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]."""
    tokenizer = load_tokenizer(LLAMA2_TOKENIZER)
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
    assert chat.dialog_tokens(tokenizer, dialog) == expected
    assert chat.dialog_tokens(tokenizer, [{"role": "user", "content": "Hi"}]) == [1] + sp.encode("[INST] Hi [/INST]")
    bad_dialogs = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}],
        [],
    ]
    for bad in bad_dialogs:
        with pytest.raises(UserError, match="alternating"):
            chat.dialog_tokens(tokenizer, bad)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_streamed_pieces_join_to_the_full_text(llm: Llama, temperature: float):
    prompt = ONCE["prompt_ids"]
    settings = Sampling(max_tokens=60, temperature=temperature, top_p=0.9, seed=7)
    pieces = [piece for _, piece in llm.stream([prompt], settings)]
    (result,) = llm.generate([prompt], settings)
    assert len(pieces) > 20, "text should arrive piece by piece"
    assert "".join(p.text for p in pieces) == result.text and sum((p.ids for p in pieces), []) == result.ids
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1) and pieces[-1].finish_reason == "length"


def test_streams_of_several_prompts_keep_their_order(llm: Llama):
    """Pieces of prompts generated together carry their prompt's index; each joins to its text."""
    prompts = [ONCE["prompt_ids"], LILY["prompt_ids"], [1]]
    texts = ["", "", ""]
    for i, piece in llm.stream(prompts, Sampling(max_tokens=30)):
        texts[i] += piece.text
    assert texts == [c.text for c in llm.generate(prompts, Sampling(max_tokens=30))]


def test_text_completion_matches_llama2c_text(llm: Llama):
    (result,) = llm.text_completion([ONCE["prompt"]], Sampling(max_tokens=40))
    assert result.prompt == ONCE["prompt_ids"] and result.ids == ONCE["generated_ids"][:40]
    assert ONCE["text"].startswith(ONCE["prompt"] + result.text) and len(result.text) > 100


def test_prompt_length_and_vocabulary_limits(world1):
    llm = Llama.build(STORIES, max_seq_len=32, max_batch_size=2)
    with pytest.raises(UserError, match="max_seq_len"):
        llm.generate([[1] * 32], Sampling(max_tokens=4))
    (result,) = llm.generate([[1] * 31], Sampling(max_tokens=4))
    assert len(result.ids) == 1 and result.finish_reason == "length", "a prompt of max_seq_len - 1 tokens leaves room for one new token"
    with pytest.raises(UserError, match="empty"):
        llm.generate([[1], []], Sampling(max_tokens=4))
    with pytest.raises(UserError, match="outside the vocabulary"):
        llm.generate([[1, 512]], Sampling(max_tokens=4))
    with pytest.raises(UserError, match="max_tokens"):
        Sampling(max_tokens=0)
    assert len(llm.generate([[1]] * 5, Sampling(max_tokens=3))) == 5, "more prompts than rows wait for one"
