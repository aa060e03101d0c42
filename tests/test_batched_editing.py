"""edit_many(batch_size=k): several edits trained at once give the codebook one-at-a-time editing gives."""

from __future__ import annotations

import pytest
import torch
from conftest import NEAR_PROMPTS, TINY_MODELS, codebook_of
from peft import get_peft_model

from grace_peft import EditsPartlyApplied, GraceConfig, GraceEditor
from grace_peft.codebook import CodebookOperation
from grace_peft.evaluation import EditRecord, run_lifelong

FAR_EDITS = [
    ("the capital of australia is", "canberra"),
    ("who leads apple", "satya"),
    ("my favourite colour is", "green"),
    ("tim cook lives in", "london"),
]
# the second prompt is near the first (a SPLIT): it must not be trained in the same batch as the first
MIXED_EDITS = [(NEAR_PROMPTS[0], "canberra"), ("who leads apple", "satya"), (NEAR_PROMPTS[1], "paris"),
               ("my favourite colour is", "green")]


def editor_for(kind: str, **config) -> GraceEditor:
    tiny = TINY_MODELS[kind]()
    options = {"target_modules": [tiny.target], "eps_init": tiny.eps_init, "replacement": tiny.replacement, **config}
    return GraceEditor(get_peft_model(tiny.fresh(), GraceConfig(**options)), tiny.tokenizer, progress=False)


def assert_same_codebook(batched, single):
    a, b = codebook_of(batched.model), codebook_of(single.model)
    for name in ("label_tokens", "label_lengths", "edit_ids", "next_edit_id"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # padding changes float rounding, nothing else
    torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.radii, b.radii, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.values.detach(), b.values.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("edits", [FAR_EDITS, MIXED_EDITS], ids=["far", "mixed"])
def test_batched_editing_gives_the_one_at_a_time_codebook(kind, edits):
    single, batched = editor_for(kind), editor_for(kind)
    one_by_one = single.edit_many(edits)
    together = batched.edit_many(edits, batch_size=4)
    assert [r.operation for r in together] == [r.operation for r in one_by_one]
    assert [r.edit_id for r in together] == [r.edit_id for r in one_by_one] == [0, 1, 2, 3]
    assert all(r.success for r in together)
    # each row has its own optimizer and stops when its own target is predicted
    assert [r.steps for r in together] == [r.steps for r in one_by_one]
    assert_same_codebook(batched, single)


def test_a_row_that_reaches_an_entry_of_its_own_batch_starts_the_next_batch(monkeypatch):
    editor = editor_for("gpt2")
    batches = []
    original = editor._apply_rows

    def recording(encoded, edits):
        reports = original(encoded, edits)
        batches.append([report.prompt for report in reports])
        return reports

    monkeypatch.setattr(editor, "_apply_rows", recording)
    reports = editor.edit_many(MIXED_EDITS, batch_size=4)
    assert batches == [[MIXED_EDITS[0][0], MIXED_EDITS[1][0]], [MIXED_EDITS[2][0], MIXED_EDITS[3][0]]]
    assert [r.operation for r in reports] == [CodebookOperation.ADD, CodebookOperation.ADD, CodebookOperation.SPLIT,
                                              CodebookOperation.ADD]


def test_far_edits_train_in_one_batch(monkeypatch):
    editor = editor_for("gpt2")  # on tiny GPT-2 these prompts lie further apart than eps_init + radius
    sizes = []
    original = editor._train

    def recording(inputs, values, *args):
        sizes.append(len(inputs["labels"]))
        return original(inputs, values, *args)

    monkeypatch.setattr(editor, "_train", recording)
    editor.edit_many(FAR_EDITS, batch_size=3)
    assert sizes == [3, 1]


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_batched_editing_of_seq2seq_and_classifiers(kind):
    tiny = TINY_MODELS[kind]()
    targets = [2, 0] if kind == "bert" else ["canberra", "satya"]
    edits = list(zip(["the capital of australia is", "who leads apple"], targets, strict=True))
    single, batched = editor_for(kind), editor_for(kind)
    one_by_one, together = single.edit_many(edits), batched.edit_many(edits, batch_size=2)
    assert tiny.kind == kind
    assert all(r.success for r in together)
    assert [r.operation for r in together] == [r.operation for r in one_by_one]
    assert_same_codebook(batched, single)


def test_skip_if_correct_skips_rows_inside_a_batch():
    editor = editor_for("gpt2", skip_if_correct=True)
    editor.edit("who leads apple", "satya")
    reports = editor.edit_many([("my favourite colour is", "green"), ("who leads apple", "satya")], batch_size=2)
    assert [r.skipped for r in reports] == [False, True]
    assert editor.num_keys() == 2


def test_an_error_in_a_batch_leaves_every_codebook_as_it_was(monkeypatch):
    editor = editor_for("gpt2")
    editor.edit("tim cook lives in", "london")
    before = {name: tensor.clone() for name, tensor in codebook_of(editor.model).state_dict().items()}

    def failing(inputs, values, *args):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(editor, "_train", failing)
    with pytest.raises(EditsPartlyApplied) as info:
        editor.edit_many(FAR_EDITS[:3], batch_size=3)
    assert info.value.failed_index == 0 and info.value.reports == []
    assert str(info.value.__cause__) == "interrupted"
    after = codebook_of(editor.model).state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        editor_for("gpt2").edit_many(FAR_EDITS, batch_size=0)


def test_lifelong_runs_with_edit_batches_score_like_one_at_a_time():
    records = [EditRecord(prompt, target) for prompt, target in FAR_EDITS]
    one = run_lifelong(editor_for("gpt2"), records, checkpoint_every=3, immediate=True, progress=False)
    two = run_lifelong(editor_for("gpt2"), records, checkpoint_every=3, immediate=True, edit_batch_size=2,
                       progress=False)
    assert one.final.rel == two.final.rel == 1.0 and two.final.count == 4
    assert [point["edits"] for point in one.checkpoints] == [3, 4]
    assert [point["edits"] for point in two.checkpoints] == [4]  # batches end at 2 and 4; 4 crosses 3
    assert two.immediate.count == 4 and two.immediate.per_record["rel"] == one.immediate.per_record["rel"]


@pytest.mark.parametrize("value_contexts", [0, 2])
def test_an_edit_that_is_done_leaves_the_training_batch(value_contexts):
    editor = editor_for("gpt2", value_init="cold", learning_rate=0.01, value_contexts=value_contexts)
    editor.frozen_blocks = []  # every training forward starts at the embeddings, where the spy sees its rows
    layer = next(iter(editor.layers.values()))
    rows = []

    def spy(module, args):
        if layer.call_state.forced_values(layer, "default") is not None:
            rows.append(len(args[0]))

    handle = editor.model.get_input_embeddings().register_forward_pre_hook(spy)
    try:
        reports = editor.edit_many(FAR_EDITS, batch_size=4)
    finally:
        handle.remove()
    steps = [report.steps for report in reports]
    assert len(set(steps)) > 1, f"setup: every edit took {steps[0]} steps; nothing to drop"
    # forward t trains the edits that needed at least t steps (the last forward of each finds it done)
    assert rows == [(1 + value_contexts) * sum(count >= t for count in steps) for t in range(max(steps) + 1)]
