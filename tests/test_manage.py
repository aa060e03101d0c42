"""Living with edits: `grace-peft list / remove / merge / trace`, `GraceEditor.explain`, `fired_edits` in generation
and the GRACE model card on every save, on tiny GPT-2 models saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import EDITS, FAR_PROMPT, TINY_MODELS, codebook_of, tiny_gpt2, wrap
from peft import PeftModel

from grace_peft import GraceEditor
from grace_peft.adapter_files import saved_codebooks
from grace_peft.apps import cli
from grace_peft.hub import CARD_MARKER
from grace_peft.inspection import fired_edits

CODEBOOK_TENSORS = ("keys", "values", "radii", "label_tokens", "label_lengths")


class Folder:
    """A tiny GPT-2 saved with its tokenizer, and adapters made from it with `grace-peft edit`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tiny = TINY_MODELS["gpt2"]()
        self.model = str(root / "model")
        self.tiny.fresh().save_pretrained(self.model)
        self.tiny.tokenizer.save_pretrained(self.model)

    def adapter(self, name: str, edits, target: str | None = None) -> str:
        path = self.root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in edits), encoding="utf-8")
        output = str(self.root / name)
        code = cli.main(["edit", self.model, str(path), "--output", output, "--no-progress", "--target-modules",
                         target or self.tiny.target, "--eps-init", str(self.tiny.eps_init), "--replacement",
                         self.tiny.replacement])
        assert code == 0
        return output

    def load(self, adapter: str) -> PeftModel:
        return PeftModel.from_pretrained(self.tiny.fresh(), adapter)

    def next_word(self, model, prompt: str) -> str:
        with torch.no_grad():
            logits = model(**self.tiny.tokenizer(prompt, return_tensors="pt")).logits
        return self.tiny.tokenizer.convert_ids_to_tokens(int(logits[0, -1].argmax()))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Folder:
    return Folder(tmp_path_factory.mktemp("manage"))


@pytest.fixture(scope="module")
def three(folder) -> str:
    return folder.adapter("three", EDITS)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- list
def test_list_json_is_the_journal_of_the_saved_adapter(folder, three, capsys):
    code, out, _ = run_cli(capsys, "list", three, "--json", "--tokenizer", folder.model)
    assert code == 0
    listed = json.loads(out)
    editor = GraceEditor(folder.load(three), folder.tiny.tokenizer, progress=False)
    assert listed == [edit.to_dict() for edit in editor.history()]
    assert [edit["target"].strip() for edit in listed] == [target for _, target in EDITS]
    assert all(edit["success"] and edit["steps"] >= 1 for edit in listed)
    assert [edit["edit_id"] for edit in listed] == [0, 1, 2]


def test_list_prints_ids_operations_radii_and_kept_text(folder, capsys):
    adapter = folder.adapter("with-text", EDITS[:2])
    code, out, _ = run_cli(capsys, "list", adapter)
    assert code == 0
    assert "2 edits in its journal" in out and "edit 1: tokens [" in out and "add (entry 1, radius" in out
    assert "prompt" not in out  # no text kept by default
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["journal_text"] is False


def test_list_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    code, _, err = run_cli(capsys, "list", str(tmp_path))
    assert code == 2 and "no adapter_config.json" in err


# ---------------------------------------------------------------------------------------------- remove
def test_remove_equals_the_adapter_made_without_that_edit(folder, three, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "remove", three, "--edit-id", "1", "--output", str(tmp_path / "out"))
    assert code == 0
    assert "Edit 1 taken back." in out and "entry 1, which it created, is removed" in out
    without = folder.adapter("without-1", [EDITS[0], EDITS[2]])
    removed, made = saved_codebooks(tmp_path / "out"), saved_codebooks(without)
    for module, codebook in made.items():
        for name in CODEBOOK_TENSORS:
            assert torch.equal(getattr(removed[module], name), getattr(codebook, name)), name
        assert removed[module].edit_ids.tolist() == [0, 2]  # ids are never reused
    model = folder.load(str(tmp_path / "out"))
    base = folder.tiny.fresh()
    assert folder.next_word(model, EDITS[1][0]) == folder.next_word(base, EDITS[1][0])  # the edit is gone
    assert folder.next_word(model, EDITS[2][0]) == EDITS[2][1]  # the others stay


def test_remove_of_an_unknown_id_writes_nothing(three, tmp_path, capsys):
    code, _, err = run_cli(capsys, "remove", three, "--edit-id", "9", "--output", str(tmp_path / "out"))
    assert code == 2 and "edit 9 is not in the journal" in err
    assert not (tmp_path / "out").exists()


def test_remove_in_place_keeps_a_loadable_adapter(folder, tmp_path, capsys):
    adapter = folder.adapter("in-place", EDITS)
    code, _, _ = run_cli(capsys, "remove", adapter, "--edit-id", "0", "--edit-id", "2", "--output", adapter)
    assert code == 0
    assert codebook_of(folder.load(adapter)).edit_ids.tolist() == [1]
    assert CARD_MARKER in (Path(adapter) / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- merge
def test_merge_of_disjoint_adapters_holds_every_edit(folder, tmp_path, capsys):
    first, second = folder.adapter("first", EDITS[:1]), folder.adapter("second", EDITS[1:])
    code, out, _ = run_cli(capsys, "merge", first, second, "--output", str(tmp_path / "merged"))
    assert code == 0
    assert "merged 2 edits" in out and "2 entries added" in out and "0 conflicts" in out
    merged = folder.load(str(tmp_path / "merged"))
    assert [folder.next_word(merged, prompt) for prompt, _ in EDITS] == [target for _, target in EDITS]
    book = codebook_of(merged)
    assert book.edit_ids.tolist() == [0, 1, 2] and int(book.next_edit_id) == 3
    (second_book,) = saved_codebooks(second).values()
    assert torch.equal(book.keys[1:], second_book.keys) and torch.equal(book.values[1:], second_book.values)
    assert torch.equal(book.radii[1:], second_book.radii)  # replayed with their own radii


def test_merge_reports_a_conflict(folder, tmp_path, capsys):
    prompt = EDITS[0][0]
    first, second = folder.adapter("c-first", [(prompt, "canberra")]), folder.adapter("c-second", [(prompt, "paris")])
    code, out, _ = run_cli(capsys, "merge", first, second, "--output", str(tmp_path / "merged"))
    assert code == 0 and "1 conflicts" in out
    assert "conflict: the second adapter's edit 0 (now 1" in out and "replaces its target" in out
    assert folder.next_word(folder.load(str(tmp_path / "merged")), prompt) == "paris"


def test_merge_refuses_adapters_of_other_layers(folder, three, tmp_path, capsys):
    other = folder.adapter("other-layer", EDITS[:1], target="h.0.mlp.c_proj")
    code, _, err = run_cli(capsys, "merge", three, other, "--output", str(tmp_path / "m"))
    assert code == 2 and "wrap different modules" in err


# ---------------------------------------------------------------------------------------------- trace / explain
def test_trace_names_the_edit_that_fired_and_its_distance(folder, three, capsys):
    code, out, _ = run_cli(capsys, "trace", folder.model, three, EDITS[1][0])
    assert code == 0
    assert "edit 1 fired ('paris'" in out or "edit 1 fired (' paris'" in out
    assert "answer (edited): 'paris" in out.replace("' paris", "'paris")
    code, out, _ = run_cli(capsys, "trace", folder.model, three, "satya lives in a city", "--json")
    assert code == 0
    (module,) = json.loads(out)["modules"]
    assert module["fired"] is False and len(module["neighbours"]) == 3


def test_explain_matches_what_inference_retrieves():
    tm = tiny_gpt2()
    model = wrap(tm)
    editor = GraceEditor(model, tm.tokenizer, progress=False)
    reports = editor.edit_many(EDITS)
    trace = editor.explain(EDITS[2][0], neighbours=5)
    (module,) = trace.modules
    assert module.fired is not None and module.fired.edit_id == reports[2].edit_id
    assert module.fired.label == tm.tokenizer(" " + EDITS[2][1], add_special_tokens=False)["input_ids"]
    distances = [neighbour.distance for neighbour in module.neighbours]
    assert distances == sorted(distances) and len(distances) == 3  # all three keys, nearest first
    assert module.fired.distance == 0.0 and "fired" in trace.summary()
    far = editor.explain(FAR_PROMPT + " a company")
    assert far.fired == [] and "no edit fired (nearest: edit" in far.summary()


def test_fired_edits_reports_each_row_of_a_generation():
    tm = tiny_gpt2()
    model = wrap(tm)
    reports = GraceEditor(model, tm.tokenizer, progress=False).edit_many(EDITS[:2])
    tm.tokenizer.padding_side = "left"
    batch = tm.tokenizer([EDITS[1][0], "satya lives in a city", EDITS[0][0]], return_tensors="pt", padding=True)
    with fired_edits(model) as fired:
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tm.tokenizer.pad_token_id)
    assert fired.edit_ids == [reports[1].edit_id, None, reports[0].edit_id]
    assert fired.rows[1] == {f"transformer.{tm.target}": None}


# ---------------------------------------------------------------------------------------------- model card
def test_save_pretrained_writes_the_grace_card(tmp_path):
    tm = tiny_gpt2()
    model = wrap(tm)
    GraceEditor(model, tm.tokenizer, progress=False).edit_many(EDITS[:2])
    model.peft_config["default"].base_model_name_or_path = "org/tiny-gpt2"
    model.save_pretrained(tmp_path, save_embedding_layers=False)  # "auto" would look the name up on the Hub
    card = (tmp_path / "README.md").read_text()
    assert "base_model: org/tiny-gpt2" in card and "# GRACE edits of `org/tiny-gpt2`" in card
    assert "[More Information Needed]" not in card and CARD_MARKER in card
    assert "It holds **2 keys** from **2 edits**" in card and "import grace_peft" in card
    assert f"| `transformer.{tm.target}` | 2 | 2 |" in card


def test_save_pretrained_keeps_a_card_the_user_wrote(tmp_path):
    tm = tiny_gpt2()
    model = wrap(tm)
    (tmp_path / "README.md").write_text("# My own notes\n\nKeep me.\n")
    model.save_pretrained(tmp_path)
    assert "Keep me." in (tmp_path / "README.md").read_text()
    assert CARD_MARKER not in (tmp_path / "README.md").read_text()
