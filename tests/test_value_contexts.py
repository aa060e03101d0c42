"""GraceConfig.value_contexts: each value is trained on its edit prompt and on the prompt after model-written texts."""

from __future__ import annotations

import pytest
import torch
from conftest import NEAR_PROMPTS, PAD, TINY_MODELS, codebook_of, grace_layer, wrap
from test_batched_editing import FAR_EDITS, assert_same_codebook

from grace_peft import GraceConfig, GraceEditor
from grace_peft.inputs import Task, encode_edit, target_predicted

PROMPT = NEAR_PROMPTS[0]


def editor_with(kind: str, **config) -> GraceEditor:
    tm = TINY_MODELS[kind]()
    return GraceEditor(wrap(tm, **config), tm.tokenizer, progress=False)


def predicted_with_value(editor: GraceEditor, prompt: str, target: str, value: torch.Tensor) -> bool:
    """Whether ``target`` is predicted after ``prompt`` when the GRACE layer replaces its output with ``value``."""
    task = Task.SEQ2SEQ_LM if editor.task is Task.SEQ2SEQ_LM else Task.CAUSAL_LM
    inputs = encode_edit(editor.tokenizer, task, prompt, target).inputs
    layer = grace_layer(editor.model)
    with torch.no_grad(), layer.call_state.forcing_values({(layer, "default"): value[None]}):
        logits = editor.model(**inputs).logits
    return bool(target_predicted(task, logits, inputs["labels"])[0])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_a_trained_value_carries_the_edit_after_every_context(kind):
    # cold values start far from the target, so training has to reach it in every context, not only the prompt's
    editor = editor_with(kind, value_contexts=4, value_init="cold")
    contexts = editor.value_contexts
    assert len(contexts) >= 3 and all(isinstance(text, str) and text for text in contexts)
    report = editor.edit(PROMPT, "paris")
    assert report.success and report.steps >= 1
    value = codebook_of(editor.model).values[0].detach()
    assert [predicted_with_value(editor, f"{context} {PROMPT}", "paris", value) for context in contexts] \
        == [True] * len(contexts)
    # the same value, untrained (a cold start), does not: the contexts are what the training reached
    untrained = editor_with(kind, value_init="cold", max_steps=1, learning_rate=1e-12)
    untrained.edit(PROMPT, "paris")
    start = codebook_of(untrained.model).values[0].detach()
    assert not all(predicted_with_value(editor, f"{context} {PROMPT}", "paris", start) for context in contexts)


def test_contexts_train_a_subject_gated_edit():
    editor = editor_with("gpt2", value_contexts=2, subject_gate=True)
    report = editor.edit(PROMPT, "paris", "australia")  # each context row carries the edit's subject too
    assert report.success and codebook_of(editor.model).gate_owners.tolist()


def test_each_training_step_sees_the_prompt_then_the_prompt_after_each_context():
    editor = editor_with("gpt2", value_contexts=3, value_init="cold")
    editor.frozen_blocks = []  # every training forward starts at the embeddings
    layer = grace_layer(editor.model)
    seen = []

    def spy(module, args):
        if layer.call_state.forced_values(layer, "default") is not None:
            seen.append(args[0].clone())

    handle = editor.model.get_input_embeddings().register_forward_pre_hook(spy)
    try:
        editor.edit_many([FAR_EDITS[0], FAR_EDITS[1]], batch_size=2)
    finally:
        handle.remove()
    assert seen, "no training forward ran"
    tokenizer = editor.tokenizer
    expected = [f"{text} {target}" for prompt, target in FAR_EDITS[:2]
                for text in (prompt, *(f"{context} {prompt}" for context in editor.value_contexts))]
    rows = [tokenizer.decode([token for token in row.tolist() if token != PAD]) for row in seen[0]]
    assert rows == [tokenizer.decode(tokenizer(text)["input_ids"]) for text in expected]
    assert all(torch.equal(batch, seen[0]) for batch in seen)


def test_contexts_are_the_models_own_seeded_text_and_leave_the_callers_rng_alone():
    editor = editor_with("gpt2", value_contexts=5)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    first = editor.value_contexts
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == editor_with("gpt2", value_contexts=5).value_contexts
    assert first != editor_with("gpt2", value_contexts=5, seed=1).value_contexts
    assert editor_with("gpt2").value_contexts == []


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_editing_with_contexts_gives_the_one_at_a_time_codebook(kind):
    single, batched = editor_with(kind, value_contexts=3), editor_with(kind, value_contexts=3)
    one_by_one = single.edit_many(FAR_EDITS)
    together = batched.edit_many(FAR_EDITS, batch_size=4)
    assert [r.steps for r in together] == [r.steps for r in one_by_one]
    assert all(r.success for r in together)
    assert_same_codebook(batched, single)


def test_without_contexts_training_is_unchanged():
    plain, zero = editor_with("gpt2"), editor_with("gpt2", value_contexts=0)
    assert [r.steps for r in plain.edit_many(FAR_EDITS)] == [r.steps for r in zero.edit_many(FAR_EDITS)]
    assert torch.equal(codebook_of(plain.model).values, codebook_of(zero.model).values)


def test_apply_without_the_prompt_text_says_what_to_pass():
    editor = editor_with("gpt2", value_contexts=2)
    encoded = encode_edit(editor.tokenizer, Task.CAUSAL_LM, PROMPT, "paris")
    with pytest.raises(ValueError, match="pass prompt= to apply"):
        editor.apply(encoded)
    assert len(codebook_of(editor.model)) == 0
    assert editor.apply(encoded, prompt=PROMPT, target="paris").success


@pytest.mark.parametrize("count", [-1, 1.5, True, "3"])
def test_value_contexts_must_be_a_whole_number(count):
    with pytest.raises(ValueError, match="value_contexts must be a whole number"):
        GraceConfig(target_modules=["x"], value_contexts=count)


def test_value_contexts_round_trips_through_the_adapter_config(tmp_path):
    GraceConfig(target_modules=["x"], value_contexts=6).save_pretrained(tmp_path)
    assert GraceConfig.from_pretrained(tmp_path).value_contexts == 6


def test_a_classifier_has_no_text_to_train_after():
    tm = TINY_MODELS["bert"]()
    with pytest.raises(ValueError, match="set value_contexts=0"):
        GraceEditor(wrap(tm, value_contexts=2), tm.tokenizer, progress=False)
