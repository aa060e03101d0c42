"""Scorer, Evaluator and run_lifelong (``grace_peft.evaluation``) on the tiny random models of ``conftest``.

Spec §8: teacher-forced token accuracy on ``prompt + " " + target`` (left padded); generation token match of
``len(target tokens)`` greedy tokens; Loc is agreement with the UNEDITED model's own predictions, not accuracy
against the locality answer; ES / ERR / TRR / Holdout are the GRACE paper's views. Spec §6: a batch of N pairs must
give exactly what N single calls give.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from conftest import EDITS, PAD, TINY_MODELS, UNEDITED, TinyModel, edited, wrap

from grace_peft import GraceEditor
from grace_peft.evaluation import (
    EditRecord,
    Evaluator,
    LifelongResult,
    LocalityReference,
    Predictions,
    Scorer,
    Scores,
    run_lifelong,
)
from grace_peft.inputs import causal_lm_token_ids
from grace_peft.query import QUERY_POSITIONS_KWARG

# Edits known to take on the tiny GPT-2 and Llama, and prompts far from all of them (see test_query_positions).
# Pairs of different prompt lengths (in tokens) and target lengths, for the batching tests.
PAIRS = (
    (EDITS[0][0], "canberra"),
    (UNEDITED[0], "tim cook"),
    (EDITS[1][0], "paris"),
    (UNEDITED[2], "red blue green"),
    (EDITS[2][0], "guitar"),
    (UNEDITED[1], "london"),
)


# --------------------------------------------------------------------------------------------------- helpers
def model_for(kind: str, which: str) -> tuple[TinyModel, torch.nn.Module]:
    if which == "edited":
        return edited(kind)
    tm = TINY_MODELS[kind]()
    return tm, tm.fresh()


def split_ids(tm: TinyModel, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """``prompt`` and ``target`` token ids built by hand: the prompt as the tokenizer encodes it (with its special
    tokens), the target as plain words after it."""
    prompt_ids = tm.tokenizer(prompt)["input_ids"]
    target_ids = tm.tokenizer(target, add_special_tokens=False)["input_ids"]
    return prompt_ids, target_ids


def rel(model, tm: TinyModel, prompt: str, target: str, protocol: str = "teacher_forced") -> float:
    scorer = Scorer(model, tm.tokenizer, batch_size=1)
    method = scorer.teacher_forced if protocol == "teacher_forced" else scorer.generated
    return float(method([prompt], [target]).accuracy()[0])


# =================================================================================================== batching
BATCH_CASES = [
    pytest.param(kind, method, which, id=f"{kind}-{method}-{which}")
    for kind in ("gpt2", "llama")
    for method in ("teacher_forced", "generated")
    for which in ("base", "edited")
]


@pytest.mark.parametrize(("kind", "method", "which"), BATCH_CASES)
def test_scorer_batch_gives_exactly_the_single_pair_tokens(kind, method, which):
    tm, model = model_for(kind, which)
    prompts, targets = [p for p, _ in PAIRS], [t for _, t in PAIRS]
    assert len({len(tm.tokenizer(p)["input_ids"]) for p in prompts}) > 2, "setup: prompts must differ in length"

    batched = getattr(Scorer(model, tm.tokenizer, batch_size=16), method)(prompts, targets)
    single = getattr(Scorer(model, tm.tokenizer, batch_size=1), method)(prompts, targets)
    ragged = getattr(Scorer(model, tm.tokenizer, batch_size=4), method)(prompts, targets)  # 4 + 2 rows

    assert single.gold == batched.gold == ragged.gold
    assert [len(tokens) for tokens in single.predicted] == [len(gold) for gold in single.gold]
    if which == "edited":  # the GRACE layer is active: every edited prompt predicts its new target alone
        edited_rows = [row for row, (p, _) in enumerate(PAIRS) if p in dict(EDITS)]
        assert single.accuracy()[edited_rows].tolist() == [1.0] * len(edited_rows)
    assert batched.predicted == single.predicted
    assert ragged.predicted == single.predicted


@pytest.mark.parametrize("method", ["teacher_forced", "generated"])
def test_t5_scorer_batch_gives_exactly_the_single_pair_tokens(method):
    tm = TINY_MODELS["t5"]()
    model = tm.fresh()
    prompts, targets = [p for p, _ in PAIRS], [t for _, t in PAIRS]
    batched = getattr(Scorer(model, tm.tokenizer, batch_size=16), method)(prompts, targets)
    single = getattr(Scorer(model, tm.tokenizer, batch_size=1), method)(prompts, targets)
    assert batched == single


# =================================================================================================== manual references
@pytest.mark.parametrize("which", ["base", "edited"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_teacher_forced_equals_a_manual_forward_pass(kind, which):
    tm, model = model_for(kind, which)
    scorer = Scorer(model, tm.tokenizer, batch_size=1)
    for prompt, target in (*EDITS, (UNEDITED[0], "tim cook"), (UNEDITED[1], "red blue green")):
        prompt_ids, target_ids = split_ids(tm, prompt, target)
        assert (prompt_ids, target_ids) == causal_lm_token_ids(tm.tokenizer, prompt, target)
        n = len(prompt_ids)
        kwargs = {QUERY_POSITIONS_KWARG: [n - 1]} if which == "edited" else {}  # GRACE queries the last prompt token
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + target_ids]), **kwargs).logits
        # the token at position n + i is predicted by the logits at n + i - 1
        manual = logits[0, n - 1: n - 1 + len(target_ids)].argmax(-1).tolist()

        got = scorer.teacher_forced([prompt], [target])
        assert got.predicted == [manual]
        assert got.gold == [target_ids]
        if which == "edited" and (prompt, target) in EDITS:
            assert manual == target_ids  # the manual pass really went through the edit


@pytest.mark.parametrize("which", ["base", "edited"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generated_equals_greedy_generate(kind, which):
    tm, model = model_for(kind, which)
    scorer = Scorer(model, tm.tokenizer, batch_size=1)
    for prompt, target in (*EDITS, (UNEDITED[0], "tim cook"), (UNEDITED[1], "red blue green")):
        prompt_ids, target_ids = split_ids(tm, prompt, target)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=len(target_ids), pad_token_id=PAD)
        expected = output[0, len(prompt_ids):].tolist()
        assert len(expected) == len(target_ids)

        got = scorer.generated([prompt], [target])
        assert got.predicted == [expected]
        assert got.gold == [target_ids]
        if which == "edited" and (prompt, target) in EDITS:
            assert expected == target_ids


# =================================================================================================== Loc
def locality_records(tm: TinyModel, model) -> list[EditRecord]:
    """Edits with far locality prompts whose answers the unedited model does NOT predict."""
    scorer = Scorer(model, tm.tokenizer, batch_size=1)
    records = []
    for (prompt, target), loc_prompt in zip(EDITS, UNEDITED, strict=True):
        base_first = scorer.teacher_forced([loc_prompt], ["rome madrid"]).predicted[0][0]
        words = ["rome", "madrid", "berlin"]
        answer = " ".join(w for w in words if tm.tokenizer.convert_tokens_to_ids(w) != base_first)
        records.append(EditRecord(prompt, target, None, loc_prompt, answer))
    return records


@pytest.mark.parametrize("protocol", ["teacher_forced", "generation"])
def test_loc_is_agreement_with_the_unedited_model_not_accuracy(causal_lm, protocol):
    tm = causal_lm
    model = wrap(tm)
    records = locality_records(tm, model)
    evaluator = Evaluator(model, tm.tokenizer, protocol=protocol, batch_size=1)
    reference = evaluator.locality_reference(records)
    assert reference.protocol == protocol
    assert all(isinstance(item, Predictions) for item in reference.predictions)

    before = evaluator.score(records, reference)
    assert before.loc == 1.0 and before.per_record["loc"] == [1.0] * len(records)
    assert before.upstream < 1.0  # the answers are not what the model predicts ...
    assert before.per_record["upstream"][0] < 1.0

    editor = GraceEditor(model, tm.tokenizer, progress=False)
    for record in records:
        assert editor.edit(record.prompt, record.target).success

    after = evaluator.score(records, reference)
    assert after.rel == 1.0
    assert after.loc == 1.0 and after.per_record["loc"] == [1.0] * len(records)  # ... yet nothing changed there
    assert after.upstream == before.upstream
    assert after.per_record["upstream"] == before.per_record["upstream"]


def test_loc_drops_when_the_edit_changes_the_locality_prompt():
    # the locality prompt IS the edit prompt: the edit changes its prediction, so Loc falls to 0 while accuracy
    # against the locality answer (the edit's target) rises to 1: Loc measures change, not correctness
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    prompt, target = EDITS[0]
    records = [EditRecord(prompt, target, None, prompt, target)]
    evaluator = Evaluator(model, tm.tokenizer, batch_size=1)
    reference = evaluator.locality_reference(records)
    before = evaluator.score(records, reference)
    assert (before.rel, before.loc, before.upstream) == (0.0, 1.0, 0.0)

    GraceEditor(model, tm.tokenizer, progress=False).edit(prompt, target)

    after = evaluator.score(records, reference)
    assert (after.rel, after.loc, after.upstream) == (1.0, 0.0, 1.0)


def test_score_without_a_reference_has_no_loc_but_has_upstream():
    tm = TINY_MODELS["gpt2"]()
    records = [EditRecord(EDITS[0][0], "canberra", None, UNEDITED[0], "rome")]
    scores = Evaluator(tm.fresh(), tm.tokenizer, batch_size=1).score(records)
    assert scores.loc is None and scores.per_record["loc"] == [None]
    assert scores.upstream is not None


@pytest.mark.parametrize(("computed", "used"), [("teacher_forced", "generation"), ("generation", "teacher_forced")])
def test_locality_reference_of_another_protocol_raises(computed, used):
    tm = TINY_MODELS["gpt2"]()
    model = tm.fresh()
    records = [EditRecord(EDITS[0][0], "canberra", None, UNEDITED[0], "rome")]
    reference = Evaluator(model, tm.tokenizer, protocol=computed).locality_reference(records)
    assert isinstance(reference, LocalityReference) and reference.protocol == computed
    with pytest.raises(ValueError, match="protocol"):
        Evaluator(model, tm.tokenizer, protocol=used).score(records, reference)
    # a hand-made reference of the other protocol is refused just the same
    forged = LocalityReference(used if computed == "generation" else "generation", reference.predictions)
    with pytest.raises(ValueError, match="protocol"):
        Evaluator(model, tm.tokenizer, protocol=computed).score(records, forged)


def test_records_without_rephrase_or_locality_give_none_not_zero():
    tm = TINY_MODELS["gpt2"]()
    model = tm.fresh()
    records = [
        EditRecord(EDITS[0][0], "canberra"),
        EditRecord(EDITS[1][0], "paris", "who is the ceo of apple", UNEDITED[0], "rome"),
        EditRecord(EDITS[2][0], "guitar"),
    ]
    evaluator = Evaluator(model, tm.tokenizer, batch_size=1)
    scores = evaluator.score(records, evaluator.locality_reference(records))
    assert scores.per_record["gen"][0] is None and scores.per_record["gen"][2] is None
    assert scores.per_record["loc"][0] is None and scores.per_record["loc"][2] is None
    assert scores.per_record["upstream"][0] is None and scores.per_record["upstream"][2] is None
    assert scores.gen == scores.per_record["gen"][1]  # the mean is over the records that have the field
    assert scores.loc == scores.per_record["loc"][1] == 1.0
    assert scores.upstream == scores.per_record["upstream"][1]

    bare = [EditRecord(p, t) for p, t in EDITS]
    scores = evaluator.score(bare, evaluator.locality_reference(bare))
    assert scores.gen is None and scores.loc is None and scores.upstream is None
    assert scores.per_record["gen"] == scores.per_record["loc"] == scores.per_record["upstream"] == [None] * 3
    assert scores.count == 3 and len(scores.per_record["rel"]) == 3


# =================================================================================================== run_lifelong
LIFELONG = [
    EditRecord("the capital of australia is", "canberra", "what city is the capital of australia", "who leads apple",
               "madrid"),
    EditRecord("the capital of france is", "paris", "what is the capital of france", "satya lives in a city", "rome"),
    EditRecord("tim cook leads", "microsoft", "who is the ceo of apple", "my favourite colour", "piano"),
    EditRecord("satya plays", "chess", "what does satya play", "the river", "berlin"),
]


@functools.cache
def lifelong_run() -> tuple[LifelongResult, list[int]]:
    """run_lifelong on tiny GPT-2 with immediate scores and a checkpoint every 2 edits; also the number of keys
    after each edit, read by a spy on the editor."""
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    editor = GraceEditor(model, tm.tokenizer, progress=False)
    keys_after: list[int] = []
    edit_many = editor.edit_many

    def spying_edit_many(edits, **options):  # one edit per call (edit_batch_size=1)
        reports = edit_many(edits, **options)
        keys_after.append(editor.num_keys())
        return reports

    editor.edit_many = spying_edit_many
    result = run_lifelong(editor, LIFELONG, batch_size=1, immediate=True, checkpoint_every=2, progress=False)
    return result, keys_after


def test_run_lifelong_final_rel_is_one_and_unedited_is_not():
    result, keys_after = lifelong_run()
    assert [record.target for record in LIFELONG] == [report.target for report in result.reports]
    assert all(report.success and not report.skipped for report in result.reports)
    assert result.protocol == "teacher_forced"
    assert result.final.rel == 1.0 and result.final.per_record["rel"] == [1.0] * 4
    assert result.unedited.rel < 1.0
    assert result.final.count == result.unedited.count == 4
    assert result.unedited.loc == 1.0  # the unedited model agrees with itself
    assert result.final.loc == 1.0
    assert result.num_keys == keys_after[-1]


def test_run_lifelong_immediate_scores_every_edit():
    result, _ = lifelong_run()
    immediate = result.immediate
    assert isinstance(immediate, Scores)
    assert immediate.count == len(LIFELONG)
    for key in ("rel", "gen", "loc", "upstream"):
        assert len(immediate.per_record[key]) == len(LIFELONG), key
        assert all(value is not None for value in immediate.per_record[key]), key
    assert immediate.per_record["rel"] == [1.0] * 4
    assert immediate.rel == 1.0
    assert immediate.per_record["loc"] == [1.0] * 4


def test_run_lifelong_checkpoints_every_two_edits():
    result, keys_after = lifelong_run()
    assert [checkpoint["edits"] for checkpoint in result.checkpoints] == [2, 4]
    assert [checkpoint["keys"] for checkpoint in result.checkpoints] == [keys_after[1], keys_after[3]]
    assert [checkpoint["count"] for checkpoint in result.checkpoints] == [2, 4]
    first, last = result.checkpoints
    assert first["rel"] == 1.0 and first["protocol"] == "teacher_forced"
    assert 0 <= first["seconds"] <= last["seconds"]
    for key in ("rel", "gen", "loc", "upstream"):  # the last checkpoint is the final model
        assert last[key] == getattr(result.final, key), key


def test_run_lifelong_paper_view_matches_the_scores():
    result, _ = lifelong_run()
    view = result.paper_view()
    assert view == {
        "ES": result.immediate.rel,
        "ERR": result.final.rel,
        "TRR": result.final.upstream,
        "TRR_unedited": result.unedited.upstream,
        "Holdout": result.final.gen,
    }
    assert view["ES"] == 1.0 and view["ERR"] == 1.0
    assert view["TRR"] is not None and view["Holdout"] is not None


def test_run_lifelong_to_dict_is_json_and_round_trips():
    result, _ = lifelong_run()
    data = result.to_dict()
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert back == data
    assert back["num_edits"] == 4 and back["num_keys"] == result.num_keys
    assert back["protocol"] == "teacher_forced"
    assert back["paper_view"] == result.paper_view()
    for name in ("unedited", "final", "immediate"):
        scores = getattr(result, name)
        for key in ("count", "rel", "gen", "loc", "upstream", "protocol"):
            assert back[name][key] == getattr(scores, key), (name, key)
        assert back[name]["per_record"] == scores.per_record
    assert back["checkpoints"] == result.checkpoints
    assert [edit["steps"] for edit in back["edits"]] == [report.steps for report in result.reports]
    assert [edit["loss"] for edit in back["edits"]] == [report.loss for report in result.reports]
    assert all(math.isfinite(edit["loss"]) for edit in back["edits"])


def test_run_lifelong_without_optional_fields_or_extras():
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    editor = GraceEditor(model, tm.tokenizer, progress=False)
    records = [EditRecord(p, t) for p, t in EDITS[:2]]
    result = run_lifelong(editor, records, batch_size=1, progress=False)
    assert result.immediate is None and result.checkpoints == []
    for scores in (result.unedited, result.final):
        assert scores.gen is None and scores.loc is None and scores.upstream is None
    assert result.final.rel == 1.0
    view = result.paper_view()
    assert view["ES"] is None and view["TRR"] is None and view["Holdout"] is None and view["ERR"] == 1.0
    data = json.loads(json.dumps(result.to_dict()))
    assert data["immediate"] is None
    assert data["final"]["gen"] is None and data["final"]["loc"] is None
    assert data["paper_view"]["Holdout"] is None


def test_run_lifelong_rejects_bad_arguments():
    tm = TINY_MODELS["gpt2"]()
    editor = GraceEditor(wrap(tm), tm.tokenizer, progress=False)
    with pytest.raises(ValueError):
        run_lifelong(editor, [], progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        run_lifelong(editor, LIFELONG, checkpoint_every=0, progress=False)
    assert editor.num_keys() == 0


def test_run_lifelong_default_batch_size_scores_what_batch_size_one_scores():
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    editor = GraceEditor(model, tm.tokenizer, progress=False)
    records = [EditRecord(prompt, target) for prompt, target in EDITS]  # prompts of 5, 3 and 3 tokens
    result = run_lifelong(editor, records, progress=False)  # batch_size=16
    assert all(report.success for report in result.reports)
    assert result.final.per_record["rel"] == [1.0] * len(records)


# =================================================================================================== seq2seq
def test_t5_teacher_forced_rel_after_an_edit():
    tm = TINY_MODELS["t5"]()
    model = wrap(tm)
    prompt, target = EDITS[0]
    scorer = Scorer(model, tm.tokenizer, batch_size=1)
    before = scorer.teacher_forced([prompt], [target])
    assert before.gold == [tm.tokenizer(text_target=target)["input_ids"]]
    assert len(before.predicted[0]) == len(before.gold[0])
    assert float(before.accuracy()[0]) < 1.0

    assert GraceEditor(model, tm.tokenizer, progress=False).edit(prompt, target).success

    after = scorer.teacher_forced([prompt], [target])
    assert after.accuracy().tolist() == [1.0]
    # and through the Evaluator, on a record next to an unedited one
    records = [EditRecord(prompt, target), EditRecord(UNEDITED[0], "canberra")]
    scores = Evaluator(model, tm.tokenizer).score(records)
    assert scores.protocol == "teacher_forced"
    assert scores.per_record["rel"][0] == 1.0
