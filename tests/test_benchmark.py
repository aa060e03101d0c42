"""CI smoke of benchmarks/lifelong.py on a tiny random GPT-2 saved to disk: the script runs end to end (single run
with the reference comparison, and sweep mode) and writes what it promises, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_gpt2

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lifelong.py"
EDITS = [
    {"prompt": "the capital of australia is", "target": "canberra", "rephrase": "what is the capital of australia",
     "locality_prompt": "tim cook lives in", "locality_answer": "london"},
    {"prompt": "the ceo of apple is", "target": "satya", "rephrase": "who leads apple",
     "locality_prompt": "who plays chess", "locality_answer": "tim"},
    {"prompt": "my favourite colour is", "target": "green", "locality_prompt": "where is the river",
     "locality_answer": "paris"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    tiny = tiny_gpt2()
    tiny.fresh().save_pretrained(folder / "model")
    tiny.tokenizer.save_pretrained(folder / "model")
    edits = folder / "edits.jsonl"
    edits.write_text("".join(json.dumps(edit) + "\n" for edit in EDITS))
    return folder, tiny


def run_script(folder: Path, tiny, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--model", str(folder / "model"), "--data", str(folder / "edits.jsonl"),
               "--target-module", tiny.target, "--eps-init", str(tiny.eps_init), "--replacement", tiny.replacement,
               "--no-progress", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_single_run_writes_scores_curves_and_reference_speed(setup):
    folder, tiny = setup
    output = folder / "single"
    run = run_script(folder, tiny, "--checkpoint-every", "2", "--reference-edits", "2", "--immediate",
                     "--output", str(output))
    assert run.returncode == 0, run.stderr
    result = json.loads((output / "result.json").read_text())
    assert result["edits"] == 3 and result["failed_edits"] == 0
    assert result["final"]["rel"] == 1.0 and result["unedited"]["rel"] < 1.0
    assert result["final"]["loc"] == 1.0 and result["unedited"]["loc"] == 1.0
    assert [point["edits"] for point in result["checkpoints"]] == [2, 3]
    assert result["paper_view"]["ES"] == 1.0 and result["paper_view"]["ERR"] == result["final"]["rel"]
    assert len(result["edit_reports"]) == 3
    speed = result["speed_vs_reference"]
    assert speed["edits"] == 2 and speed["reference"]["max_steps"] == 100
    assert speed["speedup_median"] > 0 and speed["ours"]["rel"] == 1.0
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 sequential edits, final state (teacher_forced)" in run.stdout
    assert "paper view: ES 1.000, ERR 1.000" in run.stdout
    paraphrases = result["paraphrases"]
    assert paraphrases["rephrases"] == 2 and paraphrases["fired"] in (0.0, 0.5, 1.0)
    assert paraphrases["gen_value_forced"] is not None and 0.0 <= paraphrases["gen_value_forced"] <= 1.0
    assert "rephrases that retrieve their edit" in run.stdout
    assert set(result["median_phase_s"]) == {"probe", "update", "train", "verify"}
    assert "per edit (medians):" in run.stdout and "verify" in run.stdout


def test_calibrated_run_measures_its_radius_on_background_text(setup):
    folder, tiny = setup
    output = folder / "calibrated"
    run = run_script(folder, tiny, "--key", "prompt_mean", "--calibrate", "0.05", "--value-contexts", "2",
                     "--output", str(output), "--save-adapter", str(output / "adapter"))
    assert run.returncode == 0, run.stderr
    settings = json.loads((output / "result.json").read_text())["settings"]
    assert settings["calibrate_false_hit_rate"] == 0.05 and settings["calibrate_center"] is True
    assert 0 < settings["calibrated_eps_init"] <= 2  # a chordal distance on the unit sphere
    assert settings["value_contexts"] == 2
    saved = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert (saved["eps_init"], saved["value_contexts"]) == (settings["calibrated_eps_init"], 2)
    assert f"eps_init {settings['calibrated_eps_init']:.4g}, calibrated for false-hit rate 0.05" in run.stdout


def test_sweep_writes_one_row_per_setting(setup):
    folder, tiny = setup
    output = folder / "sweep"
    run = run_script(folder, tiny, "--sweep-layers", "0,1", "--sweep-eps", "0.2,5", "--output", str(output),
                     "--target-module", "")
    assert run.returncode == 0, run.stderr
    runs = json.loads((output / "sweep.json").read_text())["runs"]
    assert [(row["layer"], row["eps_init"]) for row in runs] == [(0, 0.2), (0, 5.0), (1, 0.2), (1, 5.0)]
    table = (output / "sweep.md").read_text().splitlines()
    assert table[2].startswith("| layer | eps_init | replacement | Rel | Gen | Loc")
    assert len(table) == 4 + len(runs)
    assert all(row["edits"] == 3 and 0.0 <= row["final"]["rel"] <= 1.0 for row in runs)


def test_missing_data_file_is_a_clear_error(setup):
    folder, tiny = setup
    run = subprocess.run([sys.executable, str(SCRIPT), "--data", str(folder / "nope.json")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert "No edits file" in run.stderr and "--data" in run.stderr


def test_generation_speed_benchmark_reports_every_setting(setup):
    folder, tiny = setup
    output = folder / "generation.json"
    run = subprocess.run([sys.executable, str(SCRIPT.with_name("generation_speed.py")), "--model",
                          str(folder / "model"), "--target-module", tiny.target, "--sizes", "0,50",
                          "--new-tokens", "3", "--batch", "3", "--single-prompts", "1", "--repeats", "1",
                          "--output", str(output)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(output.read_text())
    assert list(report["settings"]) == ["base", "0 keys", "50 keys"]
    assert report["settings"]["base"]["ratio_to_base"] == {"single": 1.0, "batch": 1.0}
    assert all(setting["tokens_per_s"]["batch"] > 0 for setting in report["settings"].values())
    assert report["settings"]["50 keys"]["search"]["batch_1_ms"] > 0


def test_batched_editing_benchmark_compares_with_one_at_a_time(setup):
    folder, tiny = setup
    output = folder / "batched.json"
    run = subprocess.run([sys.executable, str(SCRIPT.with_name("batched_editing.py")), "--model", str(folder / "model"),
                          "--data", str(folder / "edits.jsonl"), "--target-module", tiny.target, "--eps-init",
                          str(tiny.eps_init), "--sizes", "1,3", "--output", str(output)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    runs = json.loads(output.read_text())["runs"]
    assert [row["batch_size"] for row in runs] == [1, 3]
    assert all(row["same_entries_as_baseline"] and row["took"] == 3 and row["rel"] == 1.0 for row in runs)
    assert runs[1]["max_value_difference"] < 1e-3 and runs[0]["speedup"] == 1.0


def test_edit_speed_benchmark_compares_with_the_minimal_reference_loop(setup):
    folder, _ = setup
    output = folder / "speed.json"
    run = subprocess.run([sys.executable, str(SCRIPT.with_name("edit_speed.py")), "--model", str(folder / "model"),
                          "--data", str(folder / "edits.jsonl"), "--reference-edits", "2", "--output", str(output),
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(output.read_text())
    assert result["edits"] == 3 and result["reference"]["edits"] == 2 and result["reference"]["steps"] == 100
    assert result["speedup_median"] == pytest.approx(result["reference"]["median_s_per_edit"]
                                                     / result["ours"]["median_s_per_edit_on_reference_edits"])
    assert set(result["ours"]["median_phase_s"]) == {"probe", "update", "train", "verify"}
    assert result["ours"]["final"]["rel"] >= result["ours"]["unedited"]["rel"]
    assert "reference loop on the first 2 edits" in run.stdout


def test_codebook_scale_benchmark_checks_the_search_and_reports_bytes_per_key(tmp_path):
    output = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, str(SCRIPT.with_name("codebook_scale.py")), "--sizes", "100,400",
                          "--key-dim", "16", "--value-dim", "8", "--repeats", "2", "--output", str(output)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(output.read_text())["rows"]
    assert [row["size"] for row in rows] == [100, 400]
    # float32 key and value, then radius, label length, edit id and one label token: 4 + 8 + 8 + 8 bytes
    assert all(row["bytes_per_key"] == pytest.approx(4 * (16 + 8) + 28, abs=0.1) for row in rows)  # + next_edit_id
    assert all(row["search_16_ms"] > 0 and row["exact_16_ms"] > 0 for row in rows)


def test_gen_loc_curves_plot_one_curve_per_sweep(setup):
    folder, tiny = setup
    for name, eps in (("small", "0.1,0.2"), ("large", "1,5")):
        run = run_script(folder, tiny, "--sweep-layers", "1", "--sweep-eps", eps, "--output", str(folder / name),
                         "--target-module", "")
        assert run.returncode == 0, run.stderr
    output = folder / "curves"
    run = subprocess.run([sys.executable, str(SCRIPT.with_name("gen_loc_curves.py")), f"small={folder / 'small'}",
                          f"large={folder / 'large'}", "--output", str(output)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    table = (output / "gen_loc.md").read_text().splitlines()
    assert [line.split("|")[1:3] for line in table[2:]] == [[" small ", " 0.1 "], [" small ", " 0.2 "],
                                                             [" large ", " 1 "], [" large ", " 5 "]]
    assert (output / "gen_loc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
