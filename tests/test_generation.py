"""generate() beyond greedy: beam search, sampling and the text-generation pipeline (spec §5), on edited tiny models.

Greedy decoding, cache on/off, left-padded batches and T5 are covered in test_query_positions.py."""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, make_tokenizer
from test_query_positions import EDITS, TEMPLATES, UNEDITED, edited, token
from transformers import pipeline

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
