"""Subject gates (``GraceConfig.subject_gate``): an entry fires only on prompts that contain its edit's subject. On
plain tensors (``Codebook.gate_mask``, gated search and update), then through the editor on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import codebook_of, tiny_gpt2, tiny_llama, wrap
from peft import PeftModel

from grace_peft import GraceEditor
from grace_peft.codebook import Codebook, CodebookContentError
from grace_peft.evaluation import read_edits

CAPITAL = ("the capital of australia is", "canberra", "australia")
SAME_WORDING_OTHER_SUBJECT = "the capital of france is"
REWORDED = "what capital australia is"


def make(eps: float = 1.0) -> Codebook:
    return Codebook(2, 3, eps_init=eps)


def edit(cb: Codebook, query, label, edit_id: int, gates=None, allowed=None):
    return cb.update(torch.tensor(query, dtype=torch.float32), torch.tensor(label), edit_id=edit_id,
                     init_value=torch.zeros(3), gates=[torch.tensor(g) for g in gates] if gates else None,
                     allowed=allowed)


# =================================================================================================== tensors
def test_gate_mask_opens_an_entry_when_one_of_its_sequences_occurs_contiguously():
    cb = make()
    edit(cb, [0.0, 0.0], [1], 0, gates=[[7, 8], [9]])
    edit(cb, [5.0, 0.0], [2], 1)  # ungated: always allowed
    edit(cb, [9.0, 0.0], [3], 2, gates=[[4]])
    mask = cb.gate_mask([[1, 7, 8, 2], [7, 2, 8], [9], [4, 4], []])
    assert mask.tolist() == [[True, True, False], [False, True, False], [True, True, False], [False, True, True],
                             [False, True, False]]
    assert make().gate_mask([[1, 2]]) is None  # nothing gated: nothing to restrict


def test_gated_search_skips_closed_entries_and_a_row_with_none_open_retrieves_nothing():
    cb = make(eps=10.0)
    edit(cb, [0.0, 0.0], [1], 0, gates=[[7]])
    edit(cb, [3.0, 0.0], [2], 1, gates=[[8]], allowed=torch.tensor([False]))  # ADD: the only key is closed to it
    assert len(cb) == 2 and cb.radii.tolist() == [10.0, 10.0]  # no SPLIT between different subjects
    queries = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.5, 0.0]])
    allowed = cb.gate_mask([[7], [8], [5]])
    index, distance = cb.nearest(queries, allowed)
    assert index.tolist() == [0, 1, -1] and distance.tolist() == [0.5, 2.5, float("inf")]
    assert cb.lookup(queries, allowed).tolist() == [0, 1, -1]
    assert cb.lookup(queries).tolist() == [0, 0, 0]  # without the gate the nearest key answers every row


def test_gated_search_is_the_exact_search_over_the_open_entries():
    gen = torch.Generator().manual_seed(3)
    cb = Codebook(16, 3, eps_init=1.0)
    for edit_id in range(200):  # past EXACT_SEARCH_UP_TO: the screened search runs on the subset
        cb.update(torch.randn(16, generator=gen) * 5, torch.tensor([edit_id % 5]), edit_id=edit_id,
                  init_value=torch.zeros(3), gates=[torch.tensor([edit_id % 7])], allowed=torch.zeros(len(cb),
                                                                                                    dtype=torch.bool))
    queries = torch.randn(6, 16, generator=gen) * 5
    prompts = [[0], [1, 2], [3], [6, 5, 4], [0, 1, 2, 3, 4, 5, 6], [9]]
    allowed = cb.gate_mask(prompts)
    index, distance = cb.nearest(queries, allowed)
    exact = torch.cdist(queries, cb.keys).masked_fill(~allowed, float("inf"))
    for row in range(len(prompts)):
        if allowed[row].any():
            assert int(index[row]) == int(exact[row].argmin()) and allowed[row, index[row]]
            assert abs(float(distance[row]) - float(exact[row].min())) < 1e-4
        else:
            assert int(index[row]) == -1


def test_removing_an_entry_removes_its_gates_and_renumbers_the_others():
    cb = make(eps=0.5)
    edit(cb, [0.0, 0.0], [1], 0, gates=[[7]])
    edit(cb, [5.0, 0.0], [2], 1, gates=[[8], [8, 9]])
    edit(cb, [9.0, 0.0], [3], 2, gates=[[4]])
    cb.remove_edit(1)
    assert cb.gate_tokens.tolist() == [7, 4] and cb.gate_lengths.tolist() == [1, 1]
    assert cb.gate_owners.tolist() == [0, 1]
    assert cb.gate_mask([[4], [8, 9]]).tolist() == [[False, True], [False, False]]


def test_gates_round_trip_and_damaged_gates_are_refused():
    cb = make()
    edit(cb, [0.0, 0.0], [1], 0, gates=[[7, 8], [9]])
    fresh = make()
    fresh.load_state_dict(cb.state_dict())
    assert fresh.gate_mask([[9], [7]]).tolist() == [[True], [False]]
    broken = dict(cb.state_dict())
    broken["gate_owners"] = torch.tensor([0, 3])
    with pytest.raises(CodebookContentError, match="gate_owners"):
        make().load_state_dict(broken)
    old = {name: tensor for name, tensor in cb.state_dict().items() if not name.startswith("gate_")}
    before_gates = make()
    result = before_gates.load_state_dict(old, strict=False)
    assert result.missing_keys == [] and before_gates.gate_mask([[1]]) is None  # saved before gates: ungated


# =================================================================================================== editor
def _editor(tm, **overrides):
    model = wrap(tm, subject_gate=True, eps_init=50.0, **overrides)  # a ball that holds every prompt of the vocab
    return model, GraceEditor(model, tm.tokenizer, progress=False)


def next_word(model, tm, prompt: str) -> str:
    with torch.no_grad():
        logits = model(**tm.tokenizer(prompt, return_tensors="pt")).logits
    return tm.tokenizer.convert_ids_to_tokens(int(logits[0, -1].argmax()))


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_a_gated_edit_fires_on_its_subject_and_not_on_the_same_wording_about_another(factory):
    tm = factory()
    base = tm.fresh()
    model, editor = _editor(tm)
    assert editor.edit(*CAPITAL).success
    assert next_word(model, tm, CAPITAL[0]) == CAPITAL[1]
    assert next_word(model, tm, REWORDED) == CAPITAL[1]
    assert next_word(model, tm, SAME_WORDING_OTHER_SUBJECT) == next_word(base, tm, SAME_WORDING_OTHER_SUBJECT)
    ungated_model = wrap(tm, eps_init=50.0)
    GraceEditor(ungated_model, tm.tokenizer, progress=False).edit(*CAPITAL[:2])
    assert next_word(ungated_model, tm, SAME_WORDING_OTHER_SUBJECT) == CAPITAL[1]  # what the gate prevents
    trace = editor.explain(SAME_WORDING_OTHER_SUBJECT)
    assert trace.fired == [] and trace.modules[0].neighbours[0].gated_out
    assert "its subject is not in the prompt" in trace.summary()


def test_gates_hold_in_batched_generation_and_after_save_and_load(tmp_path):
    tm = tiny_gpt2()
    model, editor = _editor(tm)
    editor.edit(*CAPITAL)
    editor.edit("who leads apple", "satya", "apple")
    tm.tokenizer.padding_side = "left"
    prompts = [SAME_WORDING_OTHER_SUBJECT, CAPITAL[0], "who leads microsoft", "who leads apple"]
    batch = tm.tokenizer(prompts, return_tensors="pt", padding=True)

    def generated(peft_model):
        with torch.no_grad():
            out = peft_model.generate(**batch, max_new_tokens=1, do_sample=False,
                                      pad_token_id=tm.tokenizer.pad_token_id)
        return tm.tokenizer.convert_ids_to_tokens(out[:, -1].tolist())

    base = tm.fresh()
    with torch.no_grad():
        unedited = tm.tokenizer.convert_ids_to_tokens(base.generate(**batch, max_new_tokens=1, do_sample=False,
                                                                    pad_token_id=tm.tokenizer.pad_token_id)[:, -1])
    words = generated(model)
    assert words == [unedited[0], "canberra", unedited[2], "satya"]
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tm.fresh(), tmp_path)
    assert generated(loaded) == words
    assert torch.equal(codebook_of(loaded).gate_tokens, codebook_of(model).gate_tokens)


def test_gated_edits_need_a_subject_that_the_prompt_contains():
    tm = tiny_gpt2()
    _, editor = _editor(tm)
    with pytest.raises(ValueError, match="names none"):
        editor.edit(*CAPITAL[:2])
    with pytest.raises(ValueError, match="does not occur in the edit's prompt"):
        editor.edit(CAPITAL[0], CAPITAL[1], "france")
    with pytest.raises(ValueError, match="names none"):
        editor.edit_many([CAPITAL, CAPITAL[:2]])
    assert len(codebook_of(editor.model)) == 0  # the stream is checked before the first edit


def test_edit_files_carry_the_subject(tmp_path):
    zsre = tmp_path / "zsre.json"
    zsre.write_text(json.dumps([{"src": "What does UniFirst make?", "alt": "aircraft", "subject": "UniFirst"}]))
    counterfact = tmp_path / "cf.json"
    counterfact.write_text(json.dumps([{"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
                                        "subject": "Danielle Darrieux"}]))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "the capital of australia is", "target": "canberra"}) + "\n")
    assert [read_edits(path)[0].subject for path in (zsre, counterfact, plain)] == ["UniFirst", "Danielle Darrieux",
                                                                                    None]


def test_cli_edit_with_subject_gate_gates_the_saved_entries(tmp_path, capsys):
    from grace_peft.apps import cli

    tm = tiny_gpt2()
    folder = tmp_path / "model"
    tm.fresh().save_pretrained(folder)
    tm.tokenizer.save_pretrained(folder)
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": CAPITAL[0], "target": CAPITAL[1], "subject": CAPITAL[2]}) + "\n")
    options = ["--target-modules", tm.target, "--eps-init", "50", "--replacement", tm.replacement, "--no-progress"]
    assert cli.main(["edit", str(folder), str(edits), "--output", str(tmp_path / "a"), "--subject-gate",
                     *options]) == 0
    loaded = PeftModel.from_pretrained(tm.fresh(), tmp_path / "a")
    assert loaded.peft_config["default"].subject_gate is True
    assert next_word(loaded, tm, CAPITAL[0]) == CAPITAL[1]
    assert next_word(loaded, tm, SAME_WORDING_OTHER_SUBJECT) == next_word(tm.fresh(), tm, SAME_WORDING_OTHER_SUBJECT)
    edits.write_text(json.dumps({"prompt": CAPITAL[0], "target": CAPITAL[1]}) + "\n")
    capsys.readouterr()
    code = cli.main(["edit", str(folder), str(edits), "--output", str(tmp_path / "b"), "--subject-gate", *options])
    assert code == 2 and "names none" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_subject_merged_into_the_next_token_is_gated_by_the_prompts_own_tokens():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from grace_peft.inputs import subject_gates

    # a byte-level BPE that, like SmolLM2's, merges the subject's last "." with the "'" after it ("F.C.'s")
    corpus = ["St Patrick's Athletic F.C.'s headquarters are in Dublin", "St Patrick's Athletic F.C. is based in",
              "F.C.'s F.C.'s"] * 50
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    subject, prompt = "St Patrick's Athletic F.C.", "St Patrick's Athletic F.C.'s headquarters are in"
    prompt_ids = tokenizer(prompt)["input_ids"]
    alone = tokenizer(subject, add_special_tokens=False)["input_ids"]
    assert not any(prompt_ids[i:i + len(alone)] == alone for i in range(len(prompt_ids)))  # the merge, for real
    gates = [gate.tolist() for gate in subject_gates(tokenizer, subject, prompt, prompt_ids)]
    assert tokenizer.decode(gates[0]) == "St Patrick's Athletic F.C"  # the prompt's tokens within the subject
    codebook = Codebook(2, 3, eps_init=1.0)
    codebook.update(torch.zeros(2), torch.tensor([1]), edit_id=0, init_value=torch.zeros(3),
                    gates=[torch.tensor(gate) for gate in gates])
    reworded = tokenizer("St Patrick's Athletic F.C. is based in")["input_ids"]
    other = tokenizer("Athletic F.C. is based in")["input_ids"]
    assert codebook.gate_mask([prompt_ids, reworded, other]).flatten().tolist() == [True, True, False]
