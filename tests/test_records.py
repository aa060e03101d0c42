"""Reading edit data sets: zsRE, CounterFact and plain JSON Lines files into EditRecord lists."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from grace_peft.evaluation.records import (
    FORMATS,
    EditFileError,
    EditRecord,
    detect_format,
    read_counterfact,
    read_edits,
    read_jsonl,
    read_zsre,
    records_from_dicts,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

ZSRE = {"subject": "UniFirst", "src": " What is the product made by UniFirst? ", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: who sang  the song", "loc_ans": "Queen", "cond": "uniform >> unmanned aircraft"}
COUNTERFACT = {"case_id": 42, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
               "subject": "Danielle Darrieux", "ground_truth": "French",
               "rephrase_prompt": "Where Danielle Darrieux is from, people speak", "locality_prompt":
               "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
PLAIN = {"prompt": "The capital of Australia is", "target": "Canberra", "rephrase": "Australia's capital is",
         "locality_prompt": "The capital of France is", "locality_answer": "Paris"}


def write_json(path: Path, items: list) -> Path:
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- round trips --------------------------------------------------------------------------------------------------


def test_zsre_round_trip_strips_and_keeps_inner_text(tmp_path, no_warnings):
    path = write_json(tmp_path / "z.json", [ZSRE, {**ZSRE, "src": "Second?", "rephrase": "", "loc": None}])
    assert read_zsre(path) == [
        EditRecord(prompt="What is the product made by UniFirst?", target="unmanned aircraft",
                   rephrase="What will be the product of UniFirst?", locality_prompt="nq question: who sang  the song",
                   locality_answer="Queen", subject="UniFirst", source_index=0),
        EditRecord(prompt="Second?", target="unmanned aircraft", rephrase=None, locality_prompt=None,
                   locality_answer="Queen", subject="UniFirst", source_index=1),
    ]


def test_counterfact_round_trip_accepts_string_and_nested_target(tmp_path, no_warnings):
    nested = {**COUNTERFACT, "case_id": 43, "target_new": {"str": " German", "id": "Q188"}}
    records = read_counterfact(write_json(tmp_path / "cf.json", [COUNTERFACT, nested]))
    assert records[0] == EditRecord(prompt="The mother tongue of Danielle Darrieux is", target="English",
                                    rephrase="Where Danielle Darrieux is from, people speak",
                                    locality_prompt="Michel Rocard is a native speaker of", locality_answer="French",
                                    subject="Danielle Darrieux", source_index=0)
    assert records[1].target == "German" and records[1].source_index == 1


def test_jsonl_round_trip_skips_blank_lines_and_defaults_optional_fields(tmp_path, no_warnings):
    path = write_lines(tmp_path / "e.jsonl", [json.dumps(PLAIN), "", "   ", json.dumps({"prompt": "p", "target": "t"})])
    assert read_jsonl(path) == [
        EditRecord(prompt="The capital of Australia is", target="Canberra", rephrase="Australia's capital is",
                   locality_prompt="The capital of France is", locality_answer="Paris", source_index=0),
        EditRecord(prompt="p", target="t", source_index=1),
    ]


def test_jsonl_format_accepts_a_json_list(tmp_path):
    path = write_json(tmp_path / "plain.json", [PLAIN])
    assert read_jsonl(path) == read_edits(path) == read_edits(write_lines(tmp_path / "p.jsonl", [json.dumps(PLAIN)]))


def test_records_from_dicts_matches_the_file_readers(tmp_path):
    assert records_from_dicts([ZSRE], "zsre") == read_zsre(write_json(tmp_path / "z.json", [ZSRE]))
    assert records_from_dicts([COUNTERFACT], "auto")[0].target == "English"
    with pytest.raises(EditFileError, match=r"record 1: missing required field 'target_new'"):  # first one decides
        records_from_dicts([COUNTERFACT, PLAIN], "auto")


# --- detection ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("item", "expected"), [(ZSRE, "zsre"), (COUNTERFACT, "counterfact"), (PLAIN, "jsonl")])
def test_detect_format_from_content_not_name(tmp_path, item, expected):
    assert detect_format(write_json(tmp_path / "data.jsonl", [item])) == expected
    assert detect_format(write_lines(tmp_path / "data.json", [json.dumps(item)])) == expected
    assert read_edits(tmp_path / "data.json")[0].prompt == records_from_dicts([item], expected)[0].prompt


def test_detect_format_lists_found_and_accepted_keys(tmp_path):
    path = write_json(tmp_path / "x.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(EditFileError, match=r"x\.json.*\['answer', 'question'\].*'src' and 'alt'.*'prompt' and "
                                            r"'target_new'.*'prompt' and 'target'"):
        detect_format(path)
    with pytest.raises(EditFileError, match="contains no records"):
        read_edits(write_lines(tmp_path / "empty.jsonl", [""]))


# --- real data ----------------------------------------------------------------------------------------------------


def real_file(name: str) -> Path:
    if not (DATA / name).is_file():
        pytest.skip(f"{DATA / name} is absent (the shared data folder is not checked out beside the repository)")
    return DATA / name


def test_real_zsre_file(no_warnings):
    path = real_file("zsre_dev.json")
    records = read_edits(path)
    assert detect_format(path) == "zsre" and len(records) == 599
    assert (records[0].prompt, records[0].target) == ("What is the product made by UniFirst?", "unmanned aircraft")
    assert records[0].locality_prompt.startswith("nq question: ")
    assert read_zsre(path, limit=10) == records[:10]


def test_real_counterfact_file(no_warnings):
    path = real_file("counterfact_dev.json")
    records = read_counterfact(path, limit=25)
    assert detect_format(path) == "counterfact" and len(read_edits(path)) == 9000
    assert len(records) == 25 and records[0].target == "English"
    assert all(r.rephrase and r.locality_prompt and r.locality_answer for r in records)


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"edit file not found: .*nope\.json"):
        read_edits(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope"):
        detect_format(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="unknown edit file format 'csv'.*zsre, counterfact, jsonl"):
        read_edits(tmp_path / "nope.json", "csv")
    with pytest.raises(ValueError, match="unknown"):
        records_from_dicts([], "squad")
    assert FORMATS == ("zsre", "counterfact", "jsonl")


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "p"}, r"missing required field 'target', which must be a string; "
                      r"found keys \['prompt'\]"),
    ({"target": "t"}, r"missing required field 'prompt'"),
    ({"prompt": "p", "target": 3}, r"field 'target' must be a string, got a JSON number: 3"),
    ({"prompt": "p", "target": ["a"]}, r"field 'target' must be a string, got a JSON array"),
    ({"prompt": "p", "target": None}, r"field 'target' must be a string, got a JSON null"),
    ({"prompt": "  ", "target": "t"}, r"field 'prompt' must be a non-empty string"),
    ({"prompt": "p", "target": "t", "rephrase": 5}, r"field 'rephrase' must be a string, got a JSON number"),
    ({"prompt": "p", "target": "t", "locality_answer": True}, r"field 'locality_answer' must be a string"),
    (["p", "t"], r"expected a JSON object with keys 'prompt' and 'target', got a JSON array"),
])
def test_jsonl_record_errors_name_file_record_line_and_field(tmp_path, record, message):
    path = write_lines(tmp_path / "e.jsonl", [json.dumps(PLAIN), json.dumps(record)])
    with pytest.raises(EditFileError, match=r"e\.jsonl, record 1 \(line 2\): " + message):
        read_jsonl(path)


def test_counterfact_errors_name_case_id_and_source_key(tmp_path):
    bad = [COUNTERFACT, {**COUNTERFACT, "case_id": 7, "target_new": {"id": "Q1"}}]
    with pytest.raises(EditFileError, match=r"cf\.json, record 1 \(case_id 7\): field 'target_new' \(target\) must "
                                            r"be a string or an object \{\"str\": string\}, got a JSON object"):
        read_counterfact(write_json(tmp_path / "cf.json", bad))
    with pytest.raises(EditFileError, match=r"record 0 \(case_id 42\): missing required field 'target_new'"):
        records_from_dicts([{k: v for k, v in COUNTERFACT.items() if k != "target_new"}], "counterfact")


def test_zsre_errors_name_the_zsre_key(tmp_path):
    with pytest.raises(EditFileError, match=r"z\.json, record 0: field 'alt' \(target\) must be a string"):
        read_zsre(write_json(tmp_path / "z.json", [{**ZSRE, "alt": 1.5}]))
    with pytest.raises(EditFileError, match=r"<memory>, record 0: field 'loc' \(locality_prompt\) must be a string"):
        records_from_dicts([{**ZSRE, "loc": {"q": 1}}], "zsre")


def test_malformed_json_names_the_position(tmp_path):
    with pytest.raises(EditFileError, match=r"bad\.jsonl: line 3: invalid JSON at column"):
        read_jsonl(write_lines(tmp_path / "bad.jsonl", [json.dumps(PLAIN), "", '{"prompt": "p",']))
    with pytest.raises(EditFileError, match=r"bad\.json: invalid JSON at line 2, column"):
        read_edits(write_lines(tmp_path / "bad.json", ["[", "{oops}]"]))


# --- skipping and limits ------------------------------------------------------------------------------------------


def test_empty_targets_are_skipped_with_one_warning(tmp_path):
    items = [PLAIN, {**PLAIN, "target": ""}, {**PLAIN, "target": "  \n"}, {**PLAIN, "prompt": "last"}]
    with pytest.warns(UserWarning) as caught:
        records = read_jsonl(write_json(tmp_path / "f.json", items))
    assert [str(w.message) for w in caught] == ["skipped 2 of 4 records in " + str(tmp_path / "f.json")
                                                + " with an empty target ('target')"]
    assert caught[0].filename == __file__  # points at the caller
    assert [r.source_index for r in records] == [0, 3] and records[1].prompt == "last"
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 records in <memory> with an empty target \('alt'\)"):
        assert len(records_from_dicts([ZSRE, {**ZSRE, "alt": " "}], "auto")) == 1


def test_limit_counts_kept_records_and_stops_reading_early(tmp_path, no_warnings):
    path = write_lines(tmp_path / "e.jsonl", [json.dumps(PLAIN), json.dumps({**PLAIN, "prompt": "two"}), "{broken"])
    assert [r.prompt for r in read_jsonl(path, limit=2)] == ["The capital of Australia is", "two"]
    assert read_edits(path, limit=0) == []
    with pytest.raises(EditFileError, match="line 3"):
        read_jsonl(path, limit=3)
    items = [{**PLAIN, "target": ""}, PLAIN, PLAIN, {"prompt": 1, "target": 2}]
    with pytest.warns(UserWarning, match="skipped 1 of 3 records"):
        assert [r.source_index for r in records_from_dicts(items, "jsonl", limit=2)] == [1, 2]
    with pytest.raises(ValueError, match="limit"):
        read_jsonl(path, limit=-1)
