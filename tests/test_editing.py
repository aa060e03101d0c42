"""The edit loop (``grace_peft.editing``) on tiny random GPT-2, Llama, T5 and BERT models.

Every check reads the model from outside: a separate forward pass and its argmax, logits compared bit for bit,
codebook tensors, and the fields of :class:`EditReport`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    EOS,
    FAR_PROMPT,
    NEAR_PROMPTS,
    PAD,
    TINY_MODELS,
    VOCAB,
    WORDS,
    TinyModel,
    codebook_of,
    grace_layer,
    make_tokenizer,
    target_for,
    wrap,
)
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from grace_peft import CodebookOperation, Edit, GraceEditor, Task
from grace_peft.inputs import causal_lm_token_ids, encode_edit, per_row_loss, target_predicted
from grace_peft.query import IGNORE_INDEX

ADD = CodebookOperation.ADD
EXPAND = CodebookOperation.EXPAND
SPLIT = CodebookOperation.SPLIT
OVERWRITE = CodebookOperation.OVERWRITE

# models on which the two NEAR_PROMPTS overlap with a distance that is not 0 (BERT's queries nearly coincide)
SPLIT_MODELS = ("gpt2", "llama", "t5")


# --------------------------------------------------------------------------------------------------- helpers
def editor_for(model, tm: TinyModel) -> GraceEditor:
    return GraceEditor(model, tm.tokenizer, progress=False)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in codebook_of(model).state_dict().items()}


def assert_same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def prompt_inputs(tm: TinyModel, prompt: str) -> dict[str, torch.Tensor]:
    """Inputs of a plain inference pass on the prompt alone (T5: one decoder step from the start token)."""
    inputs = dict(tm.tokenizer(prompt, return_tensors="pt"))
    if tm.kind == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[PAD]])
    return inputs


@torch.no_grad()
def answer_logits(model, tm: TinyModel, prompt: str) -> torch.Tensor:
    """Logits of the model's answer to ``prompt``: next token (causal), first decoder token (T5) or the class."""
    logits = model(**prompt_inputs(tm, prompt)).logits
    return logits[0] if tm.kind == "bert" else logits[0, -1] if tm.kind != "t5" else logits[0, 0]


def predicted(model, tm: TinyModel, prompt: str) -> str | int:
    index = int(answer_logits(model, tm, prompt).argmax())
    return index if tm.kind == "bert" else WORDS[index]


def other_target(model, tm: TinyModel, prompt: str, avoid=()) -> str | int:
    """A single-word (or class) target that the model does not predict for ``prompt`` yet."""
    current = predicted(model, tm, prompt)
    candidates = range(3) if tm.kind == "bert" else ["canberra", "paris", "london", "berlin", "rome", "madrid"]
    return next(c for c in candidates if c != current and c not in avoid)


def query_and_output(model, tm: TinyModel, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and base output of the wrapped layer at the query token (the prompt's last token)."""
    seen = {}

    def hook(module, args, output):
        seen["query"], seen["output"] = args[0][0, -1].detach().float(), output[0, -1].detach().float()

    handle = grace_layer(model).base_layer.register_forward_hook(hook)
    try:
        answer_logits(model, tm, prompt)
    finally:
        handle.remove()
    return seen["query"], seen["output"]


# --------------------------------------------------------------------------------------------------- 1. first edit
def test_first_edit_makes_the_prompt_predict_the_target(any_model):
    tm = any_model
    model = wrap(tm)
    prompt = NEAR_PROMPTS[0]
    target = other_target(model, tm, prompt)
    assert predicted(model, tm, prompt) != target

    report = editor_for(model, tm).edit(prompt, target)

    assert predicted(model, tm, prompt) == target
    assert report.success and not report.skipped
    assert report.operation is ADD
    assert report.edit_id == 0
    assert report.steps >= 1
    assert report.prompt == prompt and report.target == target
    cb = codebook_of(model)
    assert len(cb) == 1
    assert cb.edit_ids.tolist() == [0]
    assert int(cb.next_edit_id) == 1


def test_edit_report_to_dict_is_plain():
    tm = TINY_MODELS["gpt2"]()
    report = editor_for(wrap(tm), tm).edit(NEAR_PROMPTS[0], "canberra")
    data = report.to_dict()
    assert data["operations"] == {"transformer.h.1.mlp.c_proj": "add"}
    assert data["edit_id"] == 0 and data["skipped"] is False and data["steps"] == report.steps


def test_edit_report_splits_its_time_into_phases():
    tm = TINY_MODELS["gpt2"]()
    editor = editor_for(wrap(tm, skip_if_correct=True), tm)
    report = editor.edit(NEAR_PROMPTS[0], "canberra")
    assert set(report.phase_seconds) == {"probe", "update", "train", "verify"}
    assert all(seconds > 0 for seconds in report.phase_seconds.values())
    assert sum(report.phase_seconds.values()) <= report.seconds
    assert report.to_dict()["phase_seconds"] == report.phase_seconds
    skipped = editor.edit(NEAR_PROMPTS[0], "canberra")  # now predicted: nothing to train or verify
    assert skipped.skipped and set(skipped.phase_seconds) == {"probe", "update"}


# --------------------------------------------------------------------------------------------------- 2. locality
def test_unrelated_prompt_is_bit_for_bit_the_base_model(any_model):
    tm = any_model
    model = wrap(tm)
    base = tm.fresh()
    before = answer_logits(model, tm, FAR_PROMPT)
    editor = editor_for(model, tm)
    editor.edit(NEAR_PROMPTS[0], other_target(model, tm, NEAR_PROMPTS[0]))
    assert len(codebook_of(model)) == 1

    after = answer_logits(model, tm, FAR_PROMPT)
    assert torch.equal(after, answer_logits(base, tm, FAR_PROMPT))
    assert torch.equal(after, before)
    with model.disable_adapter():
        assert torch.equal(after, answer_logits(model, tm, FAR_PROMPT))
        # the edited prompt, by contrast, is changed by the adapter
        disabled_edited = answer_logits(model, tm, NEAR_PROMPTS[0])
    assert not torch.equal(disabled_edited, answer_logits(model, tm, NEAR_PROMPTS[0]))


# --------------------------------------------------------------------------------------------------- 3. split / expand
@pytest.mark.parametrize("kind", SPLIT_MODELS)
def test_conflicting_edit_near_a_key_splits_and_both_edits_hold(kind):
    tm = TINY_MODELS[kind]()
    model = wrap(tm)
    editor = editor_for(model, tm)
    first_prompt, second_prompt = NEAR_PROMPTS
    first = other_target(model, tm, first_prompt)
    second = other_target(model, tm, second_prompt, avoid=(first,))
    assert editor.edit(first_prompt, first).operation is ADD

    report = editor.edit(second_prompt, second)

    assert report.operation is SPLIT
    assert report.edit_id == 1
    cb = codebook_of(model)
    assert len(cb) == 2
    assert cb.edit_ids.tolist() == [0, 1]
    d = float((cb.keys[0] - cb.keys[1]).norm())
    assert 0 < d <= 2 * tm.eps_init  # the balls overlapped
    assert float(cb.radii[1]) == pytest.approx(d / 2, rel=1e-5)
    assert float(cb.radii[0]) <= d / 2 * (1 + 1e-5)
    assert float(cb.radii[0]) == pytest.approx(min(tm.eps_init, d / 2), rel=1e-5)
    assert cb.lookup(cb.keys).tolist() == [0, 1]
    assert predicted(model, tm, first_prompt) == first
    assert predicted(model, tm, second_prompt) == second


@pytest.mark.parametrize("kind", SPLIT_MODELS)
def test_same_label_edit_near_a_key_expands(kind):
    tm = TINY_MODELS[kind]()
    model = wrap(tm)
    editor = editor_for(model, tm)
    target = other_target(model, tm, NEAR_PROMPTS[0])
    editor.edit(NEAR_PROMPTS[0], target)
    cb = codebook_of(model)
    key, radius = cb.keys.clone(), float(cb.radii[0])
    query, _ = query_and_output(model, tm, NEAR_PROMPTS[1])

    report = editor.edit(NEAR_PROMPTS[1], target)

    assert report.operation is EXPAND
    assert report.edit_id == 1
    assert len(cb) == 1
    assert torch.equal(cb.keys, key)
    assert cb.edit_ids.tolist() == [0]  # the entry keeps the id of the edit that created it
    assert int(cb.next_edit_id) == 2
    assert float(cb.radii[0]) >= max(radius, float((query - key[0]).norm()))
    assert cb.lookup(query).tolist() == [0]
    assert predicted(model, tm, NEAR_PROMPTS[1]) == target
    assert predicted(model, tm, NEAR_PROMPTS[0]) == target


# --------------------------------------------------------------------------------------------------- 4. overwrite
def test_same_prompt_with_a_new_target_overwrites(any_model):
    tm = any_model
    model = wrap(tm)
    editor = editor_for(model, tm)
    prompt = NEAR_PROMPTS[0]
    first = other_target(model, tm, prompt)
    editor.edit(prompt, first)
    assert predicted(model, tm, prompt) == first
    cb = codebook_of(model)
    key = cb.keys.clone()
    second = other_target(model, tm, prompt, avoid=(first,))

    report = editor.edit(prompt, second)

    assert report.operation is OVERWRITE
    assert report.edit_id == 1
    assert len(cb) == 1
    assert torch.equal(cb.keys, key)
    assert cb.edit_ids.tolist() == [1]
    expected_label = [second] if tm.kind == "bert" else [VOCAB[second]]
    assert cb.label(0).tolist() == expected_label
    assert predicted(model, tm, prompt) == second


# --------------------------------------------------------------------------------------------------- 5. skip_if_correct
def test_skip_if_correct_skips_an_edit_already_predicted(any_model):
    tm = any_model
    model = wrap(tm, skip_if_correct=True)
    prompt = NEAR_PROMPTS[0]
    already = predicted(model, tm, prompt)
    before = snapshot(model)

    report = editor_for(model, tm).edit(prompt, already)

    assert report.skipped and report.success
    assert report.edit_id is None
    assert report.operations == {} and report.operation is None and report.steps == 0
    assert_same_tensors(before, snapshot(model))
    assert len(codebook_of(model)) == 0 and int(codebook_of(model).next_edit_id) == 0


def test_skip_if_correct_still_applies_an_edit_not_yet_predicted():
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm, skip_if_correct=True)
    report = editor_for(model, tm).edit(NEAR_PROMPTS[0], "canberra")
    assert not report.skipped and report.edit_id == 0 and report.operation is ADD
    assert predicted(model, tm, NEAR_PROMPTS[0]) == "canberra"


def test_without_skip_if_correct_a_predicted_edit_is_applied(any_model):
    tm = any_model
    model = wrap(tm)
    prompt = NEAR_PROMPTS[0]
    already = predicted(model, tm, prompt)

    report = editor_for(model, tm).edit(prompt, already)

    assert not report.skipped
    assert report.edit_id == 0
    assert report.operation is ADD
    assert report.success
    assert len(codebook_of(model)) == 1
    assert predicted(model, tm, prompt) == already
    if tm.replacement == "replace_last":
        # a warm value replaces the query token's output by itself: nothing to train, the model is unchanged
        assert report.steps == 0
        assert torch.equal(answer_logits(model, tm, prompt), answer_logits(tm.fresh(), tm, prompt))


# --------------------------------------------------------------------------------------------------- 6. early stop
def test_early_stop_predicted_stops_before_max_steps(any_model):
    tm = any_model
    model = wrap(tm, early_stop="predicted", max_steps=50)
    target = other_target(model, tm, NEAR_PROMPTS[0])
    report = editor_for(model, tm).edit(NEAR_PROMPTS[0], target)
    assert 1 <= report.steps < 50
    assert report.success
    assert predicted(model, tm, NEAR_PROMPTS[0]) == target


def test_early_stop_never_runs_max_steps(any_model):
    tm = any_model
    model = wrap(tm, early_stop="never", max_steps=5)
    report = editor_for(model, tm).edit(NEAR_PROMPTS[0], other_target(model, tm, NEAR_PROMPTS[0]))
    assert report.steps == 5


def test_early_stop_loss_follows_the_loss_not_the_prediction():
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm, early_stop="loss", stop_loss=50.0, max_steps=10)
    report = editor_for(model, tm).edit(NEAR_PROMPTS[0], "canberra")
    assert report.steps == 0  # the untrained loss is already below 50, though the target is not predicted
    assert report.loss < 50.0 and not report.success
    assert predicted(model, tm, NEAR_PROMPTS[0]) != "canberra"
    model = wrap(tm, early_stop="loss", stop_loss=1e-9, max_steps=3)
    assert editor_for(model, tm).edit(NEAR_PROMPTS[0], "canberra").steps == 3


# --------------------------------------------------------------------------------------------------- 7. edit ids
def test_edit_ids_increase_skip_nothing_and_continue_after_save_load(tmp_path):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm, skip_if_correct=True)
    editor = editor_for(model, tm)
    edits = [
        (NEAR_PROMPTS[0], "canberra"),  # ADD -> entry 0
        Edit(NEAR_PROMPTS[0], "canberra"),  # already predicted now: skipped
        {"prompt": FAR_PROMPT, "target": "microsoft"},  # ADD -> entry 1
        (NEAR_PROMPTS[1], "paris"),  # SPLIT -> entry 2
    ]

    reports = editor.edit_many(edits)

    assert [r.edit_id for r in reports] == [0, None, 1, 2]
    assert [r.skipped for r in reports] == [False, True, False, False]
    assert [r.operation for r in reports] == [ADD, None, ADD, SPLIT]
    cb = codebook_of(model)
    assert cb.edit_ids.tolist() == [0, 1, 2]
    assert int(cb.next_edit_id) == 3
    assert editor.num_keys() == 3

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tm.fresh(), tmp_path)
    loaded_cb = codebook_of(loaded)
    assert loaded_cb.edit_ids.tolist() == [0, 1, 2]
    assert int(loaded_cb.next_edit_id) == 3

    report = editor_for(loaded, tm).edit(NEAR_PROMPTS[0], "london")  # same prompt, new label: OVERWRITE
    assert report.edit_id == 3
    assert report.operation is OVERWRITE
    assert loaded_cb.edit_ids.tolist() == [3, 1, 2]
    assert int(loaded_cb.next_edit_id) == 4
    assert editor_for(loaded, tm).edit(NEAR_PROMPTS[1], "berlin").edit_id == 4
    assert predicted(loaded, tm, NEAR_PROMPTS[0]) == "london"


def test_skipped_edits_take_no_id():
    tm = TINY_MODELS["llama"]()
    model = wrap(tm, skip_if_correct=True)
    editor = editor_for(model, tm)
    already = predicted(model, tm, FAR_PROMPT)
    reports = editor.edit_many([(FAR_PROMPT, already), (NEAR_PROMPTS[0], "canberra"), (FAR_PROMPT, already)])
    assert [r.edit_id for r in reports] == [None, 0, None]
    assert int(codebook_of(model).next_edit_id) == 1


# --------------------------------------------------------------------------------------------------- 8. persistence
def test_edits_survive_save_and_load_bit_for_bit(any_model, tmp_path):
    tm = any_model
    model = wrap(tm)
    editor = editor_for(model, tm)
    prompts = (NEAR_PROMPTS[0], FAR_PROMPT)
    targets = {}
    for prompt in prompts:
        targets[prompt] = other_target(model, tm, prompt, avoid=tuple(targets.values()))
        assert editor.edit(prompt, targets[prompt]).success
    unedited = "my favourite colour is"
    expected = {p: answer_logits(model, tm, p) for p in (*prompts, unedited)}

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tm.fresh(), tmp_path)

    assert_same_tensors(snapshot(model), snapshot(loaded))
    for prompt in prompts:
        assert predicted(loaded, tm, prompt) == targets[prompt]
    for prompt, logits in expected.items():
        assert torch.equal(answer_logits(loaded, tm, prompt), logits), prompt


# --------------------------------------------------------------------------------------------------- 9. value init
def trained_value(tm: TinyModel, global_seed: int, **overrides) -> torch.Tensor:
    model = wrap(tm, value_init="cold", early_stop="never", max_steps=3, **overrides)
    torch.manual_seed(global_seed)  # the global RNG must not matter
    editor_for(model, tm).edit(NEAR_PROMPTS[0], "canberra")
    return codebook_of(model).values.detach().clone()


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_cold_values_are_deterministic_per_seed(kind):
    tm = TINY_MODELS[kind]()
    first = trained_value(tm, global_seed=1)
    assert torch.equal(first, trained_value(tm, global_seed=2))
    assert not torch.equal(first, trained_value(tm, global_seed=1, seed=1))


@pytest.mark.parametrize("value_init", ["cold", "warm"])
def test_editing_does_not_touch_the_global_rng(value_init):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm, value_init=value_init)
    editor = editor_for(model, tm)
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    editor.edit(NEAR_PROMPTS[0], "canberra")
    editor.edit(NEAR_PROMPTS[1], "paris")
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5", "bert"])
def test_warm_value_starts_from_the_layer_output_and_cold_does_not(kind):
    tm = TINY_MODELS[kind]()
    settings = dict(early_stop="never", max_steps=1, learning_rate=1e-8)
    prompt = NEAR_PROMPTS[0]
    _, base_output = query_and_output(wrap(tm), tm, prompt)
    values = {}
    for value_init in ("warm", "cold"):
        model = wrap(tm, value_init=value_init, **settings)
        target = other_target(model, tm, prompt)
        assert editor_for(model, tm).edit(prompt, target).steps == 1
        values[value_init] = codebook_of(model).values[0].detach()
    scale = float(base_output.norm())
    assert float((values["warm"] - base_output).norm()) < 1e-4 * scale + 1e-5
    assert float((values["cold"] - base_output).norm()) > 0.1 * scale


# --------------------------------------------------------------------------------------------------- 10. atomic edits
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_an_edit_that_raises_midway_leaves_the_codebook_untouched(monkeypatch, error):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm, early_stop="never", max_steps=5)
    editor = editor_for(model, tm)
    editor.edit(NEAR_PROMPTS[0], "canberra")
    before = snapshot(model)
    model.train()

    original_step = torch.optim.Adam.step
    calls = []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error("optimizer failed")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(error):
        editor.edit(NEAR_PROMPTS[1], "paris")  # would SPLIT: shrink entry 0's radius and add entry 1
    monkeypatch.undo()

    assert len(calls) == 2
    assert_same_tensors(before, snapshot(model))
    assert len(codebook_of(model)) == 1
    assert model.training and all(module.training for module in model.modules())
    model.eval()  # no dropout from here on
    assert predicted(model, tm, NEAR_PROMPTS[0]) == "canberra"
    # the failed edit took no id, and editing goes on normally
    report = editor.edit(NEAR_PROMPTS[1], "paris")
    assert report.edit_id == 1 and report.operation is SPLIT


def test_a_forward_that_raises_during_training_leaves_the_codebook_untouched(monkeypatch):
    tm = TINY_MODELS["llama"]()
    model = wrap(tm)
    editor = editor_for(model, tm)
    editor.edit(NEAR_PROMPTS[0], "canberra")
    before = snapshot(model)
    mlp = model.get_submodule("base_model.model.model.layers.1.mlp")
    original_forward = mlp.forward
    calls = []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # probe, first training step, second training step
            raise Boom("forward failed")
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", failing_forward)
    with pytest.raises(Boom):
        editor.edit(NEAR_PROMPTS[0], "paris")  # would OVERWRITE entry 0
    monkeypatch.undo()

    assert len(calls) == 3
    assert_same_tensors(before, snapshot(model))
    assert predicted(model, tm, NEAR_PROMPTS[0]) == "canberra"


# --------------------------------------------------------------------------------------------------- 11. bad input
@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(any_model, prompt):
    tm = any_model
    model = wrap(tm)
    with pytest.raises(ValueError, match="non-empty prompt"):
        editor_for(model, tm).edit(prompt, 0 if tm.kind == "bert" else "canberra")
    assert len(codebook_of(model)) == 0


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("target", ["", "  ", None, 3])
def test_empty_or_non_string_target_is_refused(kind, target):
    tm = TINY_MODELS[kind]()
    model = wrap(tm)
    with pytest.raises(ValueError, match="non-empty target"):
        editor_for(model, tm).edit(NEAR_PROMPTS[0], target)
    assert len(codebook_of(model)) == 0


@pytest.mark.parametrize("target", ["canberra", "2", 2.0, True, None])
def test_classifier_target_must_be_an_int_class_id(target):
    tm = TINY_MODELS["bert"]()
    model = wrap(tm)
    with pytest.raises(ValueError, match="class id"):
        editor_for(model, tm).edit(NEAR_PROMPTS[0], target)
    assert len(codebook_of(model)) == 0


@pytest.mark.parametrize("item", [{"prompt": NEAR_PROMPTS[0]}, {"target": "canberra"}, {}])
def test_edit_dict_without_keys_is_refused_before_any_edit(item):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    with pytest.raises(ValueError, match="needs 'prompt' and 'target' keys"):
        editor_for(model, tm).edit_many([(FAR_PROMPT, "canberra"), item])
    assert len(codebook_of(model)) == 0


@pytest.mark.parametrize("item", [("only a prompt",), ("a", "b", "c", "d"), "the capital of australia is", 42])
def test_unreadable_edit_items_are_refused(item):
    tm = TINY_MODELS["gpt2"]()
    with pytest.raises(ValueError, match="Cannot read an edit"):
        editor_for(wrap(tm), tm).edit_many([item])


def test_editor_refuses_a_model_without_a_grace_adapter():
    tm = TINY_MODELS["gpt2"]()
    with pytest.raises(ValueError, match="No GRACE adapter"):
        GraceEditor(tm.fresh(), tm.tokenizer, progress=False)
    lora = get_peft_model(tm.fresh(), LoraConfig(target_modules=["c_proj"], r=2))
    with pytest.raises(ValueError, match="No GRACE adapter"):
        GraceEditor(lora, tm.tokenizer, progress=False)
    with pytest.raises(ValueError, match="No GRACE adapter named 'other'"):
        GraceEditor(wrap(tm), tm.tokenizer, adapter_name="other", progress=False)


def test_detected_tasks():
    expected = {"gpt2": Task.CAUSAL_LM, "llama": Task.CAUSAL_LM, "t5": Task.SEQ2SEQ_LM,
                "bert": Task.SEQUENCE_CLASSIFICATION}
    for kind, task in expected.items():
        tm = TINY_MODELS[kind]()
        assert editor_for(wrap(tm), tm).task is task


@pytest.mark.parametrize("training", [True, False])
def test_editing_restores_the_training_mode_of_every_module(training):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    model.train(training)
    grace_layer(model).base_layer.train(not training)  # one module with its own flag
    modes = {name: module.training for name, module in model.named_modules()}

    editor_for(model, tm).edit(NEAR_PROMPTS[0], "canberra")

    assert {name: module.training for name, module in model.named_modules()} == modes


def test_dropout_is_off_while_editing():
    """A model left in training mode still edits deterministically: two identical runs train identical values."""
    tm = TINY_MODELS["gpt2"]()
    values = []
    for global_seed in (1, 2):
        model = wrap(tm, early_stop="never", max_steps=3)
        model.train()
        torch.manual_seed(global_seed)
        editor_for(model, tm).edit(NEAR_PROMPTS[0], "canberra")
        values.append(codebook_of(model).values.detach().clone())
    assert torch.equal(values[0], values[1])


# --------------------------------------------------------------------------------------------------- 12. tokenization
def byte_level_bpe() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sentences = ["The capital of Australia is Canberra.", "Canberra is a city.", "I live in Canberra and Sydney.",
                 "The capital of France is Paris."]
    backend.train_from_iterator(sentences * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.mark.parametrize("template", [None, "bos"])
@pytest.mark.parametrize("prompt, target", [
    ("the capital of australia is", "canberra"),
    ("the capital of australia is", " canberra"),
    ("the capital of australia is ", "canberra"),
    ("who leads apple", "tim cook"),
])
def test_causal_lm_token_ids_with_a_word_level_tokenizer(template, prompt, target):
    tokenizer = make_tokenizer(template)
    prompt_ids, target_ids = causal_lm_token_ids(tokenizer, prompt, target)
    assert prompt_ids == tokenizer(prompt)["input_ids"]
    assert prompt_ids + target_ids == tokenizer(prompt.strip() + " " + target.strip())["input_ids"]
    assert target_ids == [VOCAB[word] for word in target.split()]


def test_causal_lm_token_ids_drop_an_appended_eos():
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", EOS)])
    assert tokenizer("the capital")["input_ids"][-1] == EOS
    prompt_ids, target_ids = causal_lm_token_ids(tokenizer, "the capital of australia is", "canberra")
    assert prompt_ids == [VOCAB[w] for w in "the capital of australia is".split()]
    assert target_ids == [VOCAB["canberra"]]


def test_causal_lm_token_ids_with_a_byte_level_bpe_keep_the_leading_space_once():
    tokenizer = byte_level_bpe()
    prompt = "The capital of Australia is"
    spaced = tokenizer(" Canberra", add_special_tokens=False)["input_ids"]
    assert spaced != tokenizer("Canberra", add_special_tokens=False)["input_ids"]  # the space matters
    for target in ("Canberra", " Canberra"):
        prompt_ids, target_ids = causal_lm_token_ids(tokenizer, prompt, target)
        assert prompt_ids == tokenizer(prompt)["input_ids"]
        assert prompt_ids + target_ids == tokenizer(prompt + " Canberra")["input_ids"]
        assert target_ids == spaced
        assert tokenizer.decode(target_ids) == " Canberra"
    # a prompt that already ends with the space: the text the model sees is still prompt + target, space once
    prompt_ids, target_ids = causal_lm_token_ids(tokenizer, prompt + " ", "Canberra")
    assert tokenizer.decode(prompt_ids + target_ids) == prompt + " Canberra"
    assert tokenizer.decode(target_ids).strip() == "Canberra"


def test_encode_edit_labels_only_the_target_tokens():
    tokenizer = make_tokenizer("bos")
    encoded = encode_edit(tokenizer, Task.CAUSAL_LM, "the capital of australia is", "tim cook")
    prompt_ids = tokenizer("the capital of australia is")["input_ids"]
    target_ids = [VOCAB["tim"], VOCAB["cook"]]
    assert encoded.inputs["input_ids"].tolist() == [prompt_ids + target_ids]
    assert encoded.inputs["labels"].tolist() == [[IGNORE_INDEX] * len(prompt_ids) + target_ids]
    assert encoded.inputs["attention_mask"].tolist() == [[1] * (len(prompt_ids) + 2)]
    assert encoded.label_ids.tolist() == target_ids
    seq2seq = encode_edit(make_tokenizer(), Task.SEQ2SEQ_LM, "the capital of australia is", "canberra")
    assert seq2seq.inputs["labels"].tolist() == [[VOCAB["canberra"]]]
    assert seq2seq.inputs["input_ids"].tolist() == [[VOCAB[w] for w in "the capital of australia is".split()]]
    classifier = encode_edit(make_tokenizer("cls"), Task.SEQUENCE_CLASSIFICATION, "the capital", 2)
    assert classifier.inputs["labels"].tolist() == [2] and classifier.label_ids.tolist() == [2]


def test_multi_token_targets_are_labelled_as_one_codebook_label():
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm, max_steps=3)
    report = editor_for(model, tm).edit(FAR_PROMPT, "tim cook")
    assert report.operation is ADD and report.steps <= 3
    assert codebook_of(model).label(0).tolist() == [VOCAB["tim"], VOCAB["cook"]]


# --------------------------------------------------------------------------------------------------- 13. scoring
def logits_with_argmax(argmax: list[list[int]], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(argmax), len(argmax[0]), vocab)
    for row, tokens in enumerate(argmax):
        for position, token in enumerate(tokens):
            logits[row, position, token] = 1.0
    return logits


def test_causal_scoring_reads_token_t_from_position_t_minus_1():
    a, b, c = 3, 5, 7
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, a, b]])
    shifted = logits_with_argmax([[c, a, b, c]])  # argmax at t-1 is label t; at t it is not
    aligned = logits_with_argmax([[c, c, a, b]])  # argmax at t is label t; at t-1 it is not
    assert target_predicted(Task.CAUSAL_LM, shifted, labels).tolist() == [True]
    assert target_predicted(Task.CAUSAL_LM, aligned, labels).tolist() == [False]
    # seq2seq decoder logits are already aligned with their labels
    assert target_predicted(Task.SEQ2SEQ_LM, aligned, labels).tolist() == [True]
    assert target_predicted(Task.SEQ2SEQ_LM, shifted, labels).tolist() == [False]


def test_causal_scoring_needs_every_target_token_and_at_least_one():
    a, b, c = 3, 5, 7
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, a, b],
                           [IGNORE_INDEX, IGNORE_INDEX, a, b],
                           [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    logits = logits_with_argmax([[c, a, b, c],  # both tokens right
                                 [c, a, c, c],  # first right, second wrong
                                 [c, a, b, c]])  # nothing labelled: nothing to be right about
    assert target_predicted(Task.CAUSAL_LM, logits, labels).tolist() == [True, False, False]


def test_classifier_scoring_compares_the_argmax_class():
    logits = torch.tensor([[0.1, 2.0, 0.3], [1.0, 0.0, 0.5]])
    assert target_predicted(Task.SEQUENCE_CLASSIFICATION, logits, torch.tensor([1, 2])).tolist() == [True, False]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5", "bert"])
@pytest.mark.parametrize("config", [{}, {"value_contexts": 2}, {"value_init": "cold", "learning_rate": 0.001,
                                                                 "max_steps": 1}, {"early_stop": "loss"}],
                         ids=["default", "contexts", "stopped-by-max-steps", "loss-rule"])
def test_reported_success_and_loss_are_what_inference_gives_right_after_the_edit(kind, config):
    if kind == "bert" and config.get("value_contexts"):
        pytest.skip("a classifier writes no text to train after (refused: test_value_contexts)")
    tm = TINY_MODELS[kind]()
    model = wrap(tm, **config)
    editor = editor_for(model, tm)
    target = target_for(kind)
    stream = [(NEAR_PROMPTS[0], target), (NEAR_PROMPTS[1], other_target(model, tm, NEAR_PROMPTS[1], (target,))),
              (NEAR_PROMPTS[0], target), (FAR_PROMPT, target), (NEAR_PROMPTS[0], other_target(model, tm,
                                                                                              NEAR_PROMPTS[0]))]
    outcomes = []
    for prompt, goal in stream:
        report = editor.edit(prompt, goal)
        inputs = encode_edit(tm.tokenizer, editor.task, prompt, goal).inputs
        with torch.no_grad():
            logits = model(**inputs).logits
        assert report.success == bool(target_predicted(editor.task, logits, inputs["labels"])[0]), prompt
        assert report.loss == pytest.approx(float(per_row_loss(editor.task, logits, inputs["labels"])[0]), abs=1e-5)
        outcomes.append(report.success)
    if config.get("max_steps") == 1 and editor.task is not Task.SEQUENCE_CLASSIFICATION:
        assert not all(outcomes), "setup: every edit took within one small step"
