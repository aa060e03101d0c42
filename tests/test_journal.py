"""The edit journal and undo (``grace_peft.journal``, ``Codebook.remove_edit``): on plain tensors, then through the
editor on tiny models (history, remove, save/load, limits, text opt-in)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EDITS, codebook_of, tiny_gpt2, wrap
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file, save_file

from grace_peft import GraceEditor
from grace_peft.codebook import Codebook, CodebookContentError, SplitRule
from grace_peft.journal import FIELDS, TABLES, EditJournal

CODEBOOK_TENSORS = ("keys", "values", "radii", "label_tokens", "label_lengths", "edit_ids")


def make(eps: float = 1.0, rule: str = "coverage", split: SplitRule | str = SplitRule.HALVE, **kwargs) -> Codebook:
    return Codebook(2, 3, eps_init=eps, expand_rule=rule, split_rule=split, **kwargs)


def edit(cb: Codebook, query, label, edit_id: int):
    update = cb.update(torch.tensor(query, dtype=torch.float32), torch.tensor(label), edit_id=edit_id,
                       init_value=torch.full((3,), 100.0 + edit_id))
    cb.set_value(update.index, torch.full((3,), 200.0 + edit_id))  # "trained"
    return update


def contents(cb: Codebook) -> dict[str, torch.Tensor]:
    return {name: getattr(cb, name).detach().clone() for name in CODEBOOK_TENSORS}


def assert_same_codebook(a: Codebook, b: Codebook) -> None:
    for name in CODEBOOK_TENSORS:
        x, y = getattr(a, name).detach(), getattr(b, name).detach()
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


# =================================================================================================== records
def test_each_operation_records_what_it_changed_before_and_after():
    cb = make(eps=1.0, rule="moving_average")
    edit(cb, [0.0, 0.0], [1], edit_id=0)  # ADD
    edit(cb, [0.5, 0.0], [1], edit_id=1)  # EXPAND: key moves to (0.25, 0), radius max(1, 0.25) = 1
    edit(cb, [1.5, 0.0], [2], edit_id=2)  # SPLIT: d = 1.25, both radii 0.625
    edit(cb, [1.5, 0.0], [3], edit_id=3)  # OVERWRITE of entry 1
    add, expand, split, overwrite = cb.journal.records()

    assert (add.operation, add.entry, add.changed, add.nearest) == ("add", 0, -1, -1)
    assert add.created and add.value_before is None and add.target.tolist() == [1]

    assert (expand.operation, expand.entry, expand.changed, expand.nearest, expand.distance) == ("expand", 0, 0, 0, 0.5)
    assert torch.equal(expand.key_before, torch.tensor([0.0, 0.0]))
    assert torch.equal(expand.key_after, torch.tensor([0.25, 0.0]))
    assert torch.equal(expand.value_before, torch.full((3,), 200.0))  # edit 0's trained value
    assert torch.equal(expand.value_after, torch.full((3,), 201.0))  # what edit 1 trained
    assert (expand.radius_before, expand.radius_after) == (1.0, 1.0)

    assert (split.operation, split.entry, split.changed, split.nearest, split.distance) == ("split", 1, 0, 0, 1.25)
    assert (split.radius_before, split.radius_after) == (1.0, 0.625)
    assert split.value_before is None and split.key_before is None

    assert (overwrite.operation, overwrite.entry, overwrite.changed) == ("overwrite", 1, 1)
    assert overwrite.label_before.tolist() == [2] and overwrite.edit_id_before == 2
    assert torch.equal(overwrite.value_before, torch.full((3,), 202.0))
    assert torch.equal(overwrite.value_after, torch.full((3,), 203.0))
    assert [record.edit_id for record in cb.journal.records()] == [0, 1, 2, 3]


def test_split_that_keeps_radii_changes_no_existing_entry():
    cb = make(eps=1.0, split=SplitRule.KEEP)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    edit(cb, [1.5, 0.0], [2], edit_id=1)
    record = cb.journal.records()[1]
    assert (record.operation, record.entry, record.changed, record.radius_before) == ("split", 1, -1, -1.0)


def test_journal_round_trips_through_its_state_dict_bit_for_bit():
    cb = make(eps=1.0, rule="moving_average")
    for edit_id, (query, label) in enumerate([([0.0, 0.0], [1]), ([0.5, 0.0], [1]), ([1.5, 0.0], [2, 4]),
                                              ([1.5, 0.0], [3]), ([9.0, 9.0], [5])]):
        edit(cb, query, label, edit_id)
    cb.journal.set_outcome(4, steps=7, success=True, seconds=0.5, loss=0.01)
    fresh = make(eps=1.0, rule="moving_average")
    fresh.load_state_dict(cb.state_dict())
    for name in TABLES:
        assert torch.equal(getattr(fresh.journal, name), getattr(cb.journal, name)), name
    last = fresh.journal.records()[-1]
    assert (last.steps, last.success, last.seconds) == (7, 1, 0.5)


def test_a_full_journal_drops_its_oldest_tenth():
    cb = make(eps=0.1, journal_limit=10)
    for edit_id in range(12):
        edit(cb, [float(edit_id), 0.0], [1], edit_id)
    kept = [record.edit_id for record in cb.journal.records()]
    assert kept == list(range(2, 12))  # a full journal (10) drops its oldest tenth (1 record) per new record
    assert len(cb) == 12  # the codebook keeps every entry
    with pytest.raises(KeyError):
        cb.remove_edit(0)


# =================================================================================================== undo
def test_removing_an_add_deletes_its_entry_and_remaps_later_records():
    cb = make(eps=0.5)
    for edit_id, query in enumerate([[0.0, 0.0], [5.0, 0.0], [10.0, 0.0]]):
        edit(cb, query, [edit_id + 1], edit_id)
    removal = cb.remove_edit(1)
    assert removal.complete and removal.restored == ["entry 1, which it created, is removed"]
    assert cb.edit_ids.tolist() == [0, 2] and cb.label_tokens.tolist() == [1, 3]
    assert [(record.edit_id, record.entry) for record in cb.journal.records()] == [(0, 0), (2, 1)]
    assert int(cb.next_edit_id) == 3  # ids are never reused


def test_removing_an_expand_restores_radius_and_value():
    cb = make(eps=1.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    before = contents(cb)
    edit(cb, [1.5, 0.0], [1], edit_id=1)  # EXPAND: radius 1.5, value retrained
    assert float(cb.radii[0]) == 1.5
    removal = cb.remove_edit(1)
    assert removal.complete
    for name, tensor in before.items():
        assert torch.equal(getattr(cb, name).detach(), tensor), name


def test_removing_a_split_restores_the_halved_radius_and_an_overwrite_the_label():
    cb = make(eps=1.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    before = contents(cb)
    edit(cb, [1.0, 0.0], [2], edit_id=1)  # SPLIT: entry 0's radius 1 -> 0.5
    cb.remove_edit(1)
    for name, tensor in before.items():
        assert torch.equal(getattr(cb, name).detach(), tensor), name
    edit(cb, [0.0, 0.0], [7, 8], edit_id=2)  # OVERWRITE: label [7, 8], edit id 2, a new value
    assert cb.label(0).tolist() == [7, 8]
    cb.remove_edit(2)
    for name, tensor in before.items():
        assert torch.equal(getattr(cb, name).detach(), tensor), name


def test_what_a_later_edit_changed_is_not_restored_and_is_named():
    cb = make(eps=1.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    edit(cb, [1.5, 0.0], [1], edit_id=1)  # EXPAND entry 0: radius 1.5, value 201
    edit(cb, [2.0, 0.0], [1], edit_id=2)  # EXPAND entry 0 again: radius 2, value 202
    removal = cb.remove_edit(1)
    assert not removal.complete
    assert removal.not_restored == ["entry 0's radius stays as later edit(s) 2 left it",
                                    "entry 0's value stays as later edit(s) 2 left it"]
    assert float(cb.radii[0]) == 2.0 and torch.equal(cb.values[0].detach(), torch.full((3,), 202.0))
    # and taking back the entry's creator removes it, naming the edit that had grown it
    removal = cb.remove_edit(0)
    assert len(cb) == 0
    assert removal.not_restored == ["edit 2 had grown entry 0 (same target) and loses it too: apply it again"]


def test_an_entry_taken_over_by_a_later_overwrite_stays():
    cb = make(eps=1.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    edit(cb, [0.0, 0.0], [2], edit_id=1)  # OVERWRITE: the entry now belongs to edit 1
    removal = cb.remove_edit(0)
    assert len(cb) == 1 and cb.edit_ids.tolist() == [1]
    assert removal.not_restored == ["entry 0, which it created, now belongs to edit 1 (an identical key with "
                                    "another target): left in place"]


points = st.tuples(st.integers(-6, 6), st.integers(-6, 6)).map(lambda xy: [xy[0] / 2, xy[1] / 2])
streams = st.lists(st.tuples(points, st.integers(1, 3)), min_size=2, max_size=12)


@settings(max_examples=150, deadline=None)
@given(stream=streams, removed=st.integers(0, 11), rule=st.sampled_from(["coverage", "paper", "moving_average"]),
       split=st.sampled_from(list(SplitRule)))
def test_undo_equals_the_stream_without_the_edit_when_no_later_edit_depended_on_it(stream, removed, rule, split):
    removed %= len(stream)
    with_it = make(eps=1.0, rule=rule, split=split)
    for edit_id, (query, label) in enumerate(stream):
        edit(with_it, query, [label], edit_id)
    records = with_it.journal.records()
    mine = {index for record in records if record.edit_id == removed for index in (record.entry, record.changed)
            if index >= 0}
    later = [record for record in records if record.edit_id > removed]
    if any(record.nearest in mine or record.touches(index) for record in later for index in mine):
        return  # a later edit was placed by this one's entries: the streams differ by design
    without = make(eps=1.0, rule=rule, split=split)
    for edit_id, (query, label) in enumerate(stream):
        if edit_id != removed:
            edit(without, query, [label], edit_id)
    changed = {record.changed for record in records if record.edit_id == removed and record.changed >= 0}
    later_without = [record for record in without.journal.records() if record.edit_id > removed]
    if any(record.nearest in changed or record.touches(index) for record in later_without for index in changed):
        return  # before this edit changed it, that entry was a later edit's nearest: the streams differ by design
    removal = with_it.remove_edit(removed)
    assert removal.complete
    assert_same_codebook(with_it, without)
    assert [r.edit_id for r in with_it.journal.records()] == [r.edit_id for r in without.journal.records()]


# =================================================================================================== corrupt files
def test_a_corrupt_journal_is_refused_and_changes_nothing():
    cb = make(eps=1.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    edit(cb, [3.0, 0.0], [2], edit_id=1)
    state = cb.state_dict()
    broken = dict(state)
    fields = state["journal_fields"].clone()
    fields[0, FIELDS.index("target_length")] = 5  # lengths no longer add up to the tokens held
    broken["journal_fields"] = fields
    fresh = make(eps=1.0)
    with pytest.raises(CodebookContentError, match="journal"):
        fresh.load_state_dict(broken)
    assert len(fresh) == 0 and len(fresh.journal) == 0


def test_an_old_codebook_without_journal_loads_with_an_empty_one():
    cb = make(eps=1.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    old = {name: tensor for name, tensor in cb.state_dict().items() if not name.startswith("journal_")}
    fresh = make(eps=1.0)
    result = fresh.load_state_dict(old, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(fresh) == 1 and len(fresh.journal) == 0
    edit(fresh, [5.0, 0.0], [2], edit_id=1)  # and it journals what comes next
    assert [record.edit_id for record in fresh.journal.records()] == [1]
    with pytest.raises(KeyError):
        fresh.remove_edit(0)


def test_a_journal_of_limit_zero_keeps_nothing_and_undo_is_refused():
    cb = make(eps=1.0, journal_limit=0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    assert len(cb) == 1 and len(cb.journal) == 0
    assert all(table.numel() == 0 for table in (getattr(cb.journal, name) for name in TABLES))
    with pytest.raises(KeyError):
        cb.remove_edit(0)
    with pytest.raises(ValueError, match=">= 0"):
        EditJournal(torch.nn.Module(), 2, 3, limit=-1)


# =================================================================================================== through the editor
def _editor(**overrides):
    tm = tiny_gpt2()
    model = wrap(tm, **overrides)
    return tm, model, GraceEditor(model, tm.tokenizer, progress=False)


def test_editor_history_lists_edits_with_outcome_and_decoded_targets():
    tm, model, editor = _editor()
    reports = editor.edit_many(EDITS[:3])
    history = editor.history()
    assert [edit.edit_id for edit in history] == [report.edit_id for report in reports]
    for edit, report in zip(history, reports, strict=True):
        assert edit.operations == {name: op.value for name, op in report.operations.items()}
        assert edit.steps == report.steps and edit.success == report.success
        assert edit.target == tm.tokenizer.decode(tm.tokenizer(" " + report.target, add_special_tokens=False)
                                                  ["input_ids"])
        assert edit.prompt is None and edit.target_text is None  # no text unless kept


def test_journal_text_is_kept_only_when_asked():
    _, _, editor = _editor(journal_text=True)
    editor.edit(*EDITS[0])
    (edit,) = editor.history()
    assert (edit.prompt, edit.target_text) == EDITS[0]


def test_editor_remove_equals_the_stream_without_that_edit(tmp_path):
    tm, model, editor = _editor()
    editor.edit_many(EDITS[:3])
    middle = editor.history()[1].edit_id
    removal = editor.remove(middle)
    assert removal.complete, removal.summary()

    _, model_without, editor_without = _editor()
    for index, item in enumerate(EDITS[:3]):
        if index == 1:
            codebook_of(model_without).next_edit_id += 1  # skip the removed edit's id, as the journal does
            continue
        editor_without.edit(*item)
    assert_same_codebook(codebook_of(model), codebook_of(model_without))
    with pytest.raises(ValueError, match=f"Edit {middle} is not in this adapter's journal"):
        editor.remove(middle)


def test_journal_survives_save_and_load_bit_for_bit(tmp_path):
    tm, model, editor = _editor(journal_text=True)
    editor.edit_many(EDITS[:3])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tm.fresh(), tmp_path)
    saved, restored = codebook_of(model).journal, codebook_of(loaded).journal
    for name in TABLES:
        assert torch.equal(getattr(restored, name), getattr(saved, name)), name
    reloaded_editor = GraceEditor(loaded, tm.tokenizer, progress=False)
    assert [e.to_dict() for e in reloaded_editor.history()] == [e.to_dict() for e in editor.history()]
    reloaded_editor.remove(editor.history()[0].edit_id)  # the loaded journal can take edits back


def test_adapter_saved_before_journals_loads_without_warning_and_journals_new_edits(tmp_path, recwarn):
    tm, model, editor = _editor()
    editor.edit_many(EDITS[:2])
    model.save_pretrained(tmp_path)
    # make it look like a folder written before journals: no journal tensors, no journal sizes in the config
    weights = tmp_path / "adapter_model.safetensors"
    save_file({name: tensor for name, tensor in load_file(weights).items() if ".journal_" not in name}, weights)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for shape in config["codebook_sizes"].values():
        shape.pop("journal")
    config.pop("save_id")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tm.fresh(), tmp_path, is_trainable=True)
    assert not [warning for warning in recwarn if "missing" in str(warning.message).lower()]
    assert len(codebook_of(loaded)) == len(codebook_of(model)) and len(codebook_of(loaded).journal) == 0
    new_editor = GraceEditor(loaded, tm.tokenizer, progress=False)
    report = new_editor.edit(*EDITS[2])
    assert [edit.edit_id for edit in new_editor.history()] == [report.edit_id]

