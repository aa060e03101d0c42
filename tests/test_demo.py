"""The SmolLM2 demo (`python -m grace_peft.apps.demo`): its edit set, the missing-model path, and the whole session on a
tiny random model saved to disk (no SmolLM2 needed)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import tiny_llama

from grace_peft import GraceConfig
from grace_peft.apps import demo, smollm2
from grace_peft.evaluation.records import EditRecord, read_jsonl

# Single-token targets of the tiny vocabulary; the tiny models do not generate them before editing.
TINY_EDITS = [
    EditRecord("the capital of australia is", "canberra", "what is the capital of australia"),
    EditRecord("the ceo of apple is", "satya", "who leads apple"),
    EditRecord("my favourite colour is", "green", "what is my favourite colour"),
]
TINY_UNRELATED = ("tim cook lives in", "who plays chess", "where is the river")


def save_base(tiny, folder) -> str:
    """Save a tiny model and its tokenizer as a checkpoint folder (what ``--base`` takes)."""
    tiny.fresh().save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_config(tiny) -> GraceConfig:
    return GraceConfig(target_modules=[tiny.target], replacement=tiny.replacement, eps_init=tiny.eps_init)


# ---------------------------------------------------------------------------------------------- the edit set
def test_builtin_edit_set_has_36_clean_records():
    lines = [line for line in demo.EDITS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert len(records) == 36
    for record in records:
        assert set(record) == {"prompt", "target", "rephrase", "subject"}
        assert record["subject"] in record["prompt"], record  # the subject gate needs it as the prompt spells it
        assert all(isinstance(value, str) and value.strip() for value in record.values()), record
        assert record["prompt"] == record["prompt"].strip(), record
        assert record["rephrase"] == record["rephrase"].strip(), record
        assert record["rephrase"] != record["prompt"], record
    prompts = [record["prompt"] for record in records]
    assert len(set(prompts)) == len(prompts)
    assert [(edit.prompt, edit.target, edit.rephrase) for edit in read_jsonl(demo.EDITS_FILE)] == \
        [(record["prompt"], record["target"], record["rephrase"]) for record in records]


def test_unrelated_prompts_are_twelve_and_not_edit_prompts():
    edits = read_jsonl(demo.EDITS_FILE)
    assert len(demo.UNRELATED_PROMPTS) == 12 == len(set(demo.UNRELATED_PROMPTS))
    subjects = {edit.subject for edit in edits}
    # four ask something else about an edit's own subject (the gate opens; the key must leave them alone)
    assert sum(any(subject in prompt for subject in subjects) for prompt in demo.UNRELATED_PROMPTS) == 4
    edited = {edit.prompt for edit in edits} | {edit.rephrase for edit in edits}
    assert not edited & set(demo.UNRELATED_PROMPTS)
    assert all(prompt == prompt.strip() for prompt in demo.UNRELATED_PROMPTS)


def test_produces_matches_whole_words_after_leading_space():
    assert demo.produces(" Rome, Italy", "Rome")
    assert demo.produces(" Rio de Janeiro.", "Rio de Janeiro")
    assert not demo.produces(" Romeo and Juliet", "Rome")
    assert not demo.produces(" the city of Rome", "Rome")


# ---------------------------------------------------------------------------------------------- CLI paths
def test_missing_smollm2_exits_2_with_the_install_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(smollm2, "is_available", lambda: False)
    monkeypatch.setattr(demo, "load_base", lambda base: pytest.fail("must not try to load a model"))
    assert demo.main(["--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert smollm2.INSTALL_HINT in error and "make demo" in error
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- tiny sessions
def test_batched_generation_equals_one_prompt_at_a_time_after_editing(causal_lm, monkeypatch):
    model, tokenizer = causal_lm.fresh(), causal_lm.tokenizer
    peft_model, reports, _, keys = demo.apply_edits(model, tokenizer, tiny_config(causal_lm), TINY_EDITS)
    assert all(report.success for report in reports) and keys == len(TINY_EDITS)
    side = tokenizer.padding_side
    batched = demo.generate_all(peft_model, tokenizer, TINY_EDITS, TINY_UNRELATED, None)
    assert tokenizer.padding_side == side == "right"  # left-padded batches, without changing the caller's tokenizer
    monkeypatch.setattr(demo, "BATCH_SIZE", 1)
    assert demo.generate_all(peft_model, tokenizer, TINY_EDITS, TINY_UNRELATED, None) == batched
    assert all(demo.produces(text, edit.target) for text, edit in zip(batched.edits, TINY_EDITS, strict=True))


def test_run_demo_on_tiny_model_edits_saves_and_reloads(causal_lm, tmp_path, monkeypatch, capsys):
    """The whole session; the "fresh process" runs the child's code path in this process (fast)."""
    base = save_base(causal_lm, tmp_path / "base")
    model, tokenizer = demo.load_base(base)
    children = []

    def run_child_here(command, check):
        assert command[:3] == [sys.executable, "-m", "grace_peft.apps.demo"] and check
        children.append(command)
        assert demo.main(command[3:]) == 0

    monkeypatch.setattr(demo.subprocess, "run", run_child_here)
    code = demo.run_demo(model, tokenizer, tiny_config(causal_lm), TINY_EDITS, TINY_UNRELATED, tmp_path / "adapter",
                         base=base)
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(children) == 1 and "--check-saved" in children[0] and base in children[0]
    assert "edits that took: 3/3, unrelated unchanged: 3/3, codebook keys: 3" in out
    assert "reloaded in a fresh process: 3/3 edits survive, 3/3 unrelated prompts unchanged" in out
    assert out.count("took ") == 3 and out.count("unchanged ") == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_run_demo_exits_1_when_the_reloaded_adapter_differs(causal_lm, tmp_path, monkeypatch, capsys):
    model, tokenizer = causal_lm.fresh(), causal_lm.tokenizer

    def lost_first_edit(output, base, edits, unrelated, max_new_tokens):
        reloaded = demo.generate_all(model, tokenizer, edits, unrelated, max_new_tokens)  # the edited model
        reloaded.edits[0] = "sydney"
        return reloaded

    monkeypatch.setattr(demo, "generate_in_fresh_process", lost_first_edit)
    code = demo.run_demo(model, tokenizer, tiny_config(causal_lm), TINY_EDITS, TINY_UNRELATED, tmp_path / "adapter")
    assert code == 1
    assert "reloaded in a fresh process: 2/3 edits survive, 3/3 unrelated prompts unchanged" in capsys.readouterr().out


def test_reload_verdict_ignores_edits_that_never_took_but_not_changed_unrelated_prompts():
    edits = TINY_EDITS[:2]
    before = demo.Generations(edits=["is", "is"], rephrases=["", ""], unrelated=["in"])
    after = demo.Generations(edits=["canberra", "is"], rephrases=["", ""], unrelated=["in"])
    missed_differs = demo.Generations(edits=["canberra", "paris"], rephrases=["", ""], unrelated=["in"])
    assert demo.reload_verdict(edits, before, after, missed_differs)
    unrelated_changed = demo.Generations(edits=["canberra", "is"], rephrases=["", ""], unrelated=["rome"])
    assert not demo.reload_verdict(edits, before, after, unrelated_changed)


def test_cli_on_a_saved_tiny_llama_reloads_in_a_fresh_process(tmp_path, monkeypatch, capsys):
    """`python -m grace_peft.apps.demo --base PATH` end to end, with the real child process."""
    tiny = tiny_llama()
    base = save_base(tiny, tmp_path / "base")
    edits_file = tmp_path / "edits.jsonl"
    edits_file.write_text("".join(json.dumps(vars(edit)) + "\n" for edit in TINY_EDITS))
    monkeypatch.setattr(demo, "UNRELATED_PROMPTS", TINY_UNRELATED)
    layer = tiny.target.split(".")[2]
    code = demo.main(["--base", base, "--edits", str(edits_file), "--layer", layer, "--eps-init", str(tiny.eps_init),
                      "--output", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "edits that took: 3/3, unrelated unchanged: 3/3" in out
    assert "reloaded in a fresh process: 3/3 edits survive, 3/3 unrelated prompts unchanged" in out
