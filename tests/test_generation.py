"""generate() beyond greedy (beam search, sampling, the text-generation pipeline) and hand-written decoding loops with
a cache object (spec §5), on edited tiny models.

Greedy decoding, cache on/off, left-padded batches and T5 are covered in test_query_positions.py."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from conftest import EDITS, PAD, TINY_MODELS, UNEDITED, edited, make_tokenizer
from peft import get_peft_model
from test_query_positions import TEMPLATES, recorded_positions, token
from transformers import DynamicCache, pipeline

from grace_peft import GraceConfig

PROMPTS = [EDITS[0][0], UNEDITED[0], EDITS[1][0]]


def generate(model, inputs, **options):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, pad_token_id=PAD, **options)


@pytest.mark.parametrize("replacement", ["replace_last", "replace_all"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_beam_search_same_with_and_without_cache_and_in_a_batch(kind, replacement):
    tm, model = edited(kind, replacement)
    tokenizer = make_tokenizer(TEMPLATES[kind], "left")
    batch = dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))
    width = batch["input_ids"].shape[1]
    options = {"num_beams": 3, "do_sample": False, "early_stopping": True}
    cached = generate(model, batch, use_cache=True, **options)
    uncached = generate(model, batch, use_cache=False, **options)
    assert cached.tolist() == uncached.tolist()
    for row, prompt in enumerate(PROMPTS):
        single = dict(tokenizer(prompt, return_tensors="pt"))
        alone = generate(model, single, use_cache=True, **options)[0, single["input_ids"].shape[1]:].tolist()
        assert cached[row, width:width + len(alone)].tolist() == alone
    # the edited prompts' best beams start with their targets; the unedited prompt keeps the base model's beams
    assert cached[0, width] == token(EDITS[0][1]) and cached[2, width] == token(EDITS[1][1])
    with model.disable_adapter():
        base = generate(model, batch, use_cache=True, **options)
    assert cached[1].tolist() == base[1].tolist()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sampling_same_with_and_without_cache(kind):
    tm, model = edited(kind, "replace_all")
    inputs = dict(make_tokenizer(TEMPLATES[kind])(EDITS[0][0], return_tensors="pt"))
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        samples.append(generate(model, inputs, use_cache=use_cache, do_sample=True, top_k=3,
                                num_return_sequences=4).tolist())
    assert samples[0] == samples[1]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_text_generation_pipeline_applies_edits_per_prompt(kind):
    tm, model = edited(kind)
    tokenizer = make_tokenizer(TEMPLATES[kind], "left")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    outputs = generator(PROMPTS, max_new_tokens=1, do_sample=False, return_full_text=False, batch_size=3,
                        pad_token_id=PAD)
    texts = [output[0]["generated_text"].strip() for output in outputs]
    assert texts[0] == EDITS[0][1] and texts[2] == EDITS[1][1]
    with model.disable_adapter():
        unedited = generator(PROMPTS[1], max_new_tokens=1, do_sample=False, return_full_text=False,
                             pad_token_id=PAD)
    assert texts[1] == unedited[0]["generated_text"].strip()


# =================================================================================================== hand-written loops
def takes_cache_as(model, keyword: str) -> bool:
    """Whether this transformers release's forward takes the cache under ``keyword`` (newer releases name it
    ``cache`` and keep ``past_key_values`` as a deprecated alias)."""
    parameters = inspect.signature(model.get_base_model().forward).parameters
    return keyword in parameters or (keyword == "past_key_values" and "cache" in parameters)


def newest_cache_keyword(model) -> str:
    return "cache" if "cache" in inspect.signature(model.get_base_model().forward).parameters else "past_key_values"


def decode_by_hand(model, inputs, cache, keyword: str, new: int = 4) -> list[int]:
    """Greedy decoding as a user writes it: a prefill with an empty cache object, then one token per forward."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **{keyword: cache}).logits
        tokens = []
        for _ in range(new):
            tokens.append(int(logits[0, -1].argmax()))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, **{keyword: cache}).logits
    return tokens


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
@pytest.mark.parametrize("replacement", ["replace_last", "replace_all"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hand_written_decoding_loop_with_a_cache_object_equals_generate(kind, replacement, keyword):
    tm, model = edited(kind, replacement)
    if not takes_cache_as(model, keyword):
        pytest.skip(f"this transformers release's forward has no {keyword!r} argument")
    tokenizer = make_tokenizer(TEMPLATES[kind])
    for prompt in (EDITS[0][0], UNEDITED[0]):
        inputs = dict(tokenizer(prompt, return_tensors="pt"))
        n = inputs["input_ids"].shape[1]
        with recorded_positions(model) as seen, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # past_key_values, deprecated in newer releases
            by_hand = decode_by_hand(model, inputs, DynamicCache(), keyword)
        assert seen == [[n - 1]] + [None] * 4  # the prefill queries; no generated token does
        assert by_hand == generate(model, inputs, do_sample=False)[0, n:].tolist()
        if prompt == EDITS[0][0]:
            assert by_hand[0] == token(EDITS[0][1])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_interleaved_decoding_loops_each_continue_their_own_prefill(kind):
    """replace_all applies a prefill's value to the tokens generated after it: two loops decoded in turn, one on an
    edited prompt and one on an unedited prompt, each keep their own prefill's decision (found by their cache)."""
    tm, model = edited(kind, "replace_all")
    tokenizer = make_tokenizer(TEMPLATES[kind])
    prompts = (EDITS[0][0], UNEDITED[0])
    expected = {}
    for prompt in prompts:
        inputs = dict(tokenizer(prompt, return_tensors="pt"))
        expected[prompt] = generate(model, inputs, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    keyword = newest_cache_keyword(model)
    state = {}
    with torch.no_grad():
        for prompt in prompts:  # both prefills first
            inputs = dict(tokenizer(prompt, return_tensors="pt"))
            cache = DynamicCache()
            logits = model(**inputs, **{keyword: cache}).logits
            state[prompt] = (cache, inputs["attention_mask"], [int(logits[0, -1].argmax())])
        for _ in range(3):  # then one step of each, in turn
            for prompt in prompts:
                cache, mask, tokens = state[prompt]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                logits = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, **{keyword: cache}).logits
                tokens.append(int(logits[0, -1].argmax()))
                state[prompt] = (cache, mask, tokens)
    for prompt in prompts:
        assert state[prompt][2] == expected[prompt]


@pytest.mark.parametrize("replacement", ["replace_last", "replace_all"])
def test_one_token_prompt_whose_answer_repeats_it(replacement):
    """A decoding step that sees the same token as a one-token prompt is still a decoding step."""
    tm, model = edited("gpt2", replacement, edits=(("football", "football"),))
    inputs = dict(make_tokenizer()("football", return_tensors="pt"))
    assert inputs["input_ids"].shape == (1, 1)
    with recorded_positions(model) as seen_cached:
        cached = generate(model, inputs, do_sample=False, use_cache=True)
    with recorded_positions(model) as seen_full:
        full = generate(model, inputs, do_sample=False, use_cache=False)
    assert cached[0, 1] == token("football")
    assert cached.tolist() == full.tolist()
    steps = cached.shape[1] - 1
    assert seen_cached == [[0]] + [None] * (steps - 1)
    assert seen_full == [[0]] * steps


def test_unload_puts_back_a_generate_the_user_installed():
    tm = TINY_MODELS["gpt2"]()
    base = tm.fresh()
    calls = []

    def own_generate(*args, **kwargs):
        calls.append(kwargs)
        return "own"

    base.generate = own_generate
    model = get_peft_model(base, GraceConfig(target_modules=[tm.target], eps_init=tm.eps_init))
    assert model.generate(input_ids=torch.tensor([[1, 2]])) == "own" and len(calls) == 1
    unloaded = model.unload()
    assert unloaded.generate is own_generate
    assert not unloaded._forward_pre_hooks and not unloaded._forward_hooks
