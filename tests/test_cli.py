"""The `grace-peft` command line (edit, eval, inspect) on tiny random GPT-2 and Llama models saved to disk."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAR_PROMPT, NEAR_PROMPTS, TINY_MODELS, WORDS, TinyModel
from peft import PeftModel
from safetensors.torch import load_file, save_file

from grace_peft import adapter_files, calibrate
from grace_peft.adapter_files import summarize_adapter
from grace_peft.apps import base_models, cli
from grace_peft.evaluation import Evaluator, read_edits

LOCALITY = ("my favourite colour is", "red")  # an unrelated prompt, far from every edit's key on both tiny models
KNOWN_PROMPT = "where is the river"  # edited to what the base model already predicts: unedited Rel is not all 0


# ---------------------------------------------------------------------------------------------- helpers
def base_prediction(tiny: TinyModel, prompt: str) -> str:
    """The word the unedited model predicts after ``prompt``."""
    inputs = tiny.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        token = int(tiny.fresh()(**inputs).logits[0, -1].argmax())
    return tiny.tokenizer.convert_ids_to_tokens(token)


def edit_records(tiny: TinyModel) -> list[dict[str, str]]:
    """Plain JSONL records with single-token targets, a rephrase and locality fields."""
    return [
        {"prompt": NEAR_PROMPTS[0], "target": "canberra", "rephrase": NEAR_PROMPTS[1],
         "locality_prompt": LOCALITY[0], "locality_answer": LOCALITY[1]},
        {"prompt": FAR_PROMPT, "target": "satya", "locality_prompt": "tim cook plays", "locality_answer": "chess"},
        {"prompt": KNOWN_PROMPT, "target": base_prediction(tiny, KNOWN_PROMPT)},
    ]


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def tiny_options(tiny: TinyModel) -> list[str]:
    """The options under which edits take on this tiny model."""
    return ["--target-modules", tiny.target, "--eps-init", str(tiny.eps_init), "--replacement", tiny.replacement]


def next_word(model: torch.nn.Module, tiny: TinyModel, prompt: str) -> str:
    with torch.no_grad():
        logits = model(**tiny.tokenizer(prompt, return_tensors="pt")).logits
    return tiny.tokenizer.convert_ids_to_tokens(int(logits[0, -1].argmax()))


def codebook(model: PeftModel, module: str):
    return model.get_base_model().get_submodule(module).grace_codebook["default"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class Saved:
    """A tiny model saved with its tokenizer, its edits file and an adapter made from it by `grace-peft edit`."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.tiny = TINY_MODELS[kind]()
        self.model = str(folder / "model")
        self.tiny.fresh().save_pretrained(self.model)
        self.tiny.tokenizer.save_pretrained(self.model)
        self.records = edit_records(self.tiny)
        self.edits = write_jsonl(folder / "edits.jsonl", self.records)
        self.adapter = str(folder / "adapter")
        self.report = folder / "report.json"
        code = cli.main(["edit", self.model, self.edits, "--output", self.adapter, "--report", str(self.report),
                         "--no-progress", *tiny_options(self.tiny)])
        assert code == 0


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """``kind -> Saved``, each built once for this module."""
    cache: dict[str, Saved] = {}

    def get(kind: str) -> Saved:
        if kind not in cache:
            cache[kind] = Saved(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def saved(request, saved_models) -> Saved:
    return saved_models(request.param)


@pytest.fixture(scope="module")
def gpt2(saved_models) -> Saved:
    return saved_models("gpt2")


# ---------------------------------------------------------------------------------------------- help
@pytest.fixture(scope="module", autouse=True)
def installed_help():
    """``grace-peft --help`` through the installed script, started with the first test of this module: a fresh
    process spends seconds importing torch, transformers and peft, so it runs while the other tests do."""
    script = Path(sys.executable).with_name("grace-peft")
    assert script.exists(), "run `pip install -e .` so that the grace-peft script exists"
    process = subprocess.Popen([str(script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.mark.parametrize(("command", "expected"), [
    ("edit", ["--target-modules", "--layer", "--eps-init", "(default: 1.0)", "(default: replace_last)",
              "(default: 100)", "(default: predicted)", "--adapter", "--report", "(default: float32)"]),
    ("eval", ["--protocol", "(default: teacher_forced)", "--batch-size", "(default: 16)", "--output"]),
    ("inspect", ["ADAPTER", "--json"]),
])
def test_command_help_explains_options_with_defaults(capsys, command, expected):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps help to the terminal width
    for fragment in expected:
        assert fragment in text


def test_usage_error_exits_2(capsys):
    code, _, err = run_cli(capsys, "edit", "model", "edits.jsonl")  # --output missing
    assert code == 2
    assert "--output" in err


# ---------------------------------------------------------------------------------------------- edit
def test_edit_writes_an_adapter_that_predicts_the_targets(saved):
    config = json.loads((Path(saved.adapter) / "adapter_config.json").read_text())
    assert config["peft_type"] == "GRACE"
    assert config["eps_init"] == saved.tiny.eps_init
    model = PeftModel.from_pretrained(saved.tiny.fresh(), saved.adapter).eval()
    for record in saved.records:
        assert next_word(model, saved.tiny, record["prompt"]) == record["target"]
    with model.disable_adapter():
        assert next_word(model, saved.tiny, NEAR_PROMPTS[0]) != "canberra"


def test_edit_report_has_one_entry_per_edit(saved, capsys):
    report = json.loads(saved.report.read_text())
    assert [entry["prompt"] for entry in report["edits"]] == [record["prompt"] for record in saved.records]
    assert [entry["source_index"] for entry in report["edits"]] == [0, 1, 2]
    assert all(entry["success"] and not entry["skipped"] for entry in report["edits"])
    assert all(set(entry["operations"]) == {report["target_modules"][0]} for entry in report["edits"])
    assert report["num_keys"] == len(codebook(PeftModel.from_pretrained(saved.tiny.fresh(), saved.adapter),
                                              report["target_modules"][0]))


def test_edit_prints_a_summary(gpt2, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "edit", gpt2.model, gpt2.edits, "-o", str(tmp_path / "a"), "--no-progress",
                           *tiny_options(gpt2.tiny))
    assert code == 0
    assert "edits applied   3" in out
    assert "took            3 / 3" in out
    assert "skipped         0" in out
    assert "codebook keys   3" in out
    assert "s/edit" in out
    assert f"adapter saved to {tmp_path / 'a'}" in out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_layer_expands_to_the_mlp_output_projection(kind, tmp_path, capsys):
    tiny = TINY_MODELS[kind]()
    tiny.fresh().save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    edits = write_jsonl(tmp_path / "edits.jsonl", [{"prompt": NEAR_PROMPTS[0], "target": "canberra"}])
    code, _, _ = run_cli(capsys, "edit", str(tmp_path / "model"), edits, "-o", str(tmp_path / "a"), "--layer", "1",
                         "--eps-init", str(tiny.eps_init), "--no-progress")
    assert code == 0
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    expected = {"gpt2": "transformer.h.1.mlp.c_proj", "llama": "model.layers.1.mlp.down_proj"}[kind]
    assert config["target_modules"] == [expected]
    assert expected.endswith(tiny.target)
    model = PeftModel.from_pretrained(tiny.fresh(), str(tmp_path / "a"))
    assert next_word(model, tiny, NEAR_PROMPTS[0]) == "canberra"


def test_default_layer_rule():
    assert base_models.default_layer("llama", 30) == 27  # SmolLM2-135M
    assert base_models.default_layer("llama", 28) == 27
    assert base_models.default_layer("llama", 24) == 22
    assert base_models.default_layer("gpt2", 12) == 10
    assert base_models.default_layer("gpt2", 48) == 46
    assert base_models.default_layer("llama", 1) == 0


def test_no_target_options_edit_the_default_layer(gpt2, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "edit", gpt2.model, gpt2.edits, "-o", str(tmp_path / "a"), "--limit", "1",
                           "--max-steps", "1", "--no-progress")
    assert code == 0
    assert "transformer.h.0.mlp.c_proj" in out  # the second-to-last of 2 blocks
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["transformer.h.0.mlp.c_proj"]
    assert config["max_steps"] == 1
    assert config["eps_init"] == 1.0


def test_zsre_file_with_format_and_limit(gpt2, tmp_path, capsys):
    edits = tmp_path / "zsre.json"
    edits.write_text(json.dumps([{"src": FAR_PROMPT, "alt": "satya", "rephrase": "", "loc": "", "loc_ans": ""},
                                 {"src": NEAR_PROMPTS[0], "alt": "canberra"}]))
    report = tmp_path / "out" / "report.json"
    code, _, _ = run_cli(capsys, "edit", gpt2.model, str(edits), "-o", str(tmp_path / "a"), "--format", "zsre",
                         "--limit", "1", "--report", str(report), "--no-progress", *tiny_options(gpt2.tiny))
    assert code == 0
    assert [entry["target"] for entry in json.loads(report.read_text())["edits"]] == ["satya"]
    assert [path.name for path in report.parent.iterdir()] == ["report.json"]  # no temporary file left behind


def test_adapter_option_continues_editing_and_grows_the_codebook(gpt2, tmp_path, capsys):
    first = write_jsonl(tmp_path / "first.jsonl", gpt2.records[:1])
    second = write_jsonl(tmp_path / "second.jsonl", gpt2.records[1:])
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run_cli(capsys, "edit", gpt2.model, first, "-o", one, "--no-progress", *tiny_options(gpt2.tiny))[0] == 0
    code, _, _ = run_cli(capsys, "edit", gpt2.model, second, "-o", two, "--adapter", one, "--no-progress")
    assert code == 0
    assert summarize_adapter(one)["num_keys"] == 1
    summary = summarize_adapter(two)
    assert summary["num_keys"] == 3
    module = summary["modules"]["transformer.h.1.mlp.c_proj"]
    assert module["distinct_edit_ids"] == 3 and module["edits_seen"] == 3  # edit ids go on from the saved ones
    assert summary["config"]["eps_init"] == gpt2.tiny.eps_init  # the configuration came from the adapter
    model = PeftModel.from_pretrained(gpt2.tiny.fresh(), two)
    for record in gpt2.records:
        assert next_word(model, gpt2.tiny, record["prompt"]) == record["target"]


def test_adapter_option_refuses_configuration_options(gpt2, tmp_path, capsys):
    code, _, err = run_cli(capsys, "edit", gpt2.model, gpt2.edits, "-o", str(tmp_path / "a"), "--adapter",
                           gpt2.adapter, "--eps-init", "0.5", "--layer", "1")
    assert code == 2
    assert err.startswith("grace-peft: error: ") and "--eps-init" in err and "--layer" in err
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("protocol", ["teacher_forced", "generation"])
def test_eval_scores_the_edits_and_the_unedited_base(saved, protocol, tmp_path, capsys):
    output = tmp_path / "scores.json"
    code, out, _ = run_cli(capsys, "eval", saved.model, saved.adapter, saved.edits, "--protocol", protocol,
                           "--output", str(output), "--no-progress")
    assert code == 0
    scores = json.loads(output.read_text())
    assert scores["protocol"] == protocol and scores["num_records"] == 3 and scores["num_keys"] == 3
    edited, unedited = scores["edited"], scores["unedited"]
    assert edited["rel"] == 1.0 and edited["gen"] == 1.0 and edited["loc"] == 1.0
    assert edited["per_record"]["loc"] == [1.0, 1.0, None]
    expected = Evaluator(saved.tiny.fresh(), saved.tiny.tokenizer, protocol=protocol, batch_size=1)
    base = expected.score(read_edits(saved.edits), expected.locality_reference(read_edits(saved.edits)))
    assert unedited["per_record"]["rel"] == base.per_record["rel"]
    assert unedited["rel"] == pytest.approx(base.rel) and unedited["rel"] < 1.0
    assert unedited["per_record"]["rel"][2] == 1.0  # the record whose target the base already predicts
    assert edited["upstream"] == pytest.approx(unedited["upstream"])

    assert f"metric ({protocol})" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in
            (["Rel"], ["Gen"], ["Loc"], ["upstream"])}
    assert rows["Rel"] == [f"{base.rel:.3f}", "1.000"]
    assert rows["Loc"][1] == "1.000"


def test_eval_batched_equals_one_at_a_time_on_gpt2(gpt2, tmp_path, capsys):
    """Left-padded rows of a batch score what they score alone (GPT-2 has absolute positions)."""
    results = []
    for batch_size in ("1", "16"):
        output = tmp_path / f"scores-{batch_size}.json"
        assert run_cli(capsys, "eval", gpt2.model, gpt2.adapter, gpt2.edits, "--batch-size", batch_size,
                       "--output", str(output), "--no-progress")[0] == 0
        results.append(json.loads(output.read_text())["edited"]["per_record"])
    assert results[0] == results[1]


# ---------------------------------------------------------------------------------------------- inspect
def test_inspect_json_equals_the_loaded_codebook(saved, capsys):
    code, out, _ = run_cli(capsys, "inspect", saved.adapter, "--json")
    assert code == 0
    summary = json.loads(out)
    module_name = json.loads(saved.report.read_text())["target_modules"][0]
    assert list(summary["modules"]) == [module_name]
    loaded = codebook(PeftModel.from_pretrained(saved.tiny.fresh(), saved.adapter), module_name)
    module = summary["modules"][module_name]
    radii = loaded.radii.tolist()
    norms = loaded.values.detach().norm(dim=-1).tolist()
    assert module["keys"] == len(loaded) == summary["num_keys"] == 3
    assert module["radii"] == {"min": min(radii), "median": statistics.median(radii), "max": max(radii)}
    assert module["distinct_edit_ids"] == len(set(loaded.edit_ids.tolist()))
    assert module["edits_seen"] == int(loaded.next_edit_id) == 3
    assert module["journal_records"] == len(loaded.journal) == 3 and module["gated_entries"] == 0
    assert module["value_norms"] == pytest.approx({"min": min(norms), "max": max(norms)})
    assert (module["key_dim"], module["value_dim"]) == (loaded.key_dim, loaded.value_dim)
    assert summary["config"] == {"base_model": saved.model, "target_modules": [saved.tiny.target],
                                 "eps_init": saved.tiny.eps_init, "eps_expand": "coverage",
                                 "replacement": saved.tiny.replacement}


def test_inspect_prints_a_readable_summary(gpt2, capsys):
    code, out, _ = run_cli(capsys, "inspect", gpt2.adapter)
    assert code == 0
    summary = summarize_adapter(gpt2.adapter)
    assert "transformer.h.1.mlp.c_proj" in out
    assert f"keys            {summary['num_keys']} (key dim 128, value dim 32)" in out
    assert f"eps init        {gpt2.tiny.eps_init}" in out
    assert "radii           min " in out and "value norms" in out


# ---------------------------------------------------------------------------------------------- errors
def _bad_edits(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "the capital of australia is", "target": "canberra"},
                                                {"prompt": "who leads apple"}])


def _torn_weights(adapter: str, tmp_path: Path) -> str:
    """A copy of a saved GRACE adapter whose weights file is cut in the middle."""
    folder = tmp_path / "torn"
    shutil.copytree(adapter, folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(folder)


def _nan_key(adapter: str, tmp_path: Path) -> str:
    """A copy of a saved GRACE adapter with a NaN in its first key."""
    folder = tmp_path / "nan-key"
    shutil.copytree(adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    (key,) = [key for key in tensors if key.endswith(".grace_codebook.keys")]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    return str(folder)


def _lora_folder(tmp_path: Path) -> str:
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return str(tmp_path / "lora")


@pytest.mark.parametrize(("argv", "message"), [
    (lambda s, t: ["edit", s.model, s.edits, "-o", str(t / "a"), "--target-modules", "h.9.mlp.c_proj"],
     "matched no module of GPT2LMHeadModel. Close matches: ['transformer.h.0.mlp.c_proj"),
    (lambda s, t: ["edit", s.model, s.edits, "-o", str(t / "a"), "--target-modules", "transformer.h.1.mlp"],
     "is a GPT2MLP"),
    (lambda s, t: ["edit", s.model, _bad_edits(t), "-o", str(t / "a")],
     "bad.jsonl, record 1 (line 2): missing required field 'target'"),
    (lambda s, t: ["edit", s.model, str(t / "missing.jsonl"), "-o", str(t / "a")], "edit file not found"),
    (lambda s, t: ["edit", str(t / "no-model"), s.edits, "-o", str(t / "a")], "model folder not found"),
    (lambda s, t: ["edit", str(t), s.edits, "-o", str(t / "a")], "not a transformers model folder"),
    (lambda s, t: ["edit", s.model, s.edits, "-o", str(t / "a"), "--layer", "7"], "layer 7 is out of range"),
    (lambda s, t: ["edit", s.model, s.edits, "-o", str(t / "a"), "--adapter", s.model], "not a GRACE adapter"),
    (lambda s, t: ["eval", s.model, s.model, s.edits], "not a GRACE adapter: it has no adapter_config.json"),
    (lambda s, t: ["inspect", s.model], "not a GRACE adapter: it has no adapter_config.json"),
    (lambda s, t: ["inspect", _lora_folder(t)], "has peft_type 'LORA'"),
    (lambda s, t: ["inspect", str(t / "nowhere")], "adapter folder not found"),
    (lambda s, t: ["inspect", _torn_weights(s.adapter, t)], "adapter_model.safetensors cannot be read"),
    (lambda s, t: ["inspect", _nan_key(s.adapter, t)], "transformer.h.1.mlp.c_proj is corrupt: its 'keys' holds NaN"),
    (lambda s, t: ["edit", s.model, s.edits, "-o", str(t / "a"), "--adapter", _nan_key(s.adapter, t)],
     "c_proj' is corrupt: its 'keys' holds NaN"),
], ids=["module-name", "module-type", "edits-record", "edits-missing", "model-missing", "not-a-model",
        "layer-range", "edit-adapter", "eval-adapter", "inspect-model-folder", "inspect-lora", "inspect-missing",
        "inspect-torn-weights", "inspect-nan-key", "edit-adapter-nan-key"])
def test_errors_exit_2_with_one_line(gpt2, tmp_path, capsys, argv, message):
    code, out, err = run_cli(capsys, *argv(gpt2, tmp_path))
    assert code == 2
    last_line = err.splitlines()[-1]  # before it, at most transformers' weight-loading progress bar
    assert last_line.startswith("grace-peft: error: ")
    assert message in last_line
    assert err.count("grace-peft: error") == 1 and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_write_json_replaces_atomically_and_writes_nan_as_null(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    cli.write_json(path, {"loss": float("nan"), "values": [1.0, float("inf")]})
    assert json.loads(path.read_text()) == {"loss": None, "values": [1.0, None]}
    assert [item.name for item in tmp_path.iterdir()] == ["out.json"]


# ---------------------------------------------------------------------------------------------- last: the script
def test_installed_script_shows_help_with_the_commands(installed_help):
    out, err = installed_help.communicate(timeout=120)
    assert installed_help.returncode == 0, err
    assert out.startswith("usage: grace-peft")
    for command in ("edit", "eval", "inspect"):
        assert f"    {command} " in out


def test_chat_without_a_template_is_a_clear_error(gpt2, tmp_path, capsys):
    code = cli.main(["edit", gpt2.model, gpt2.edits, "-o", str(tmp_path / "a"), *tiny_options(gpt2.tiny),
                     "--chat", "--no-progress"])
    assert code == 2
    assert "has no chat template" in capsys.readouterr().err


def test_batched_edit_gives_the_same_adapter_as_one_at_a_time(gpt2, tmp_path):
    for name, size in (("one", "1"), ("batched", "3")):
        assert cli.main(["edit", gpt2.model, gpt2.edits, "-o", str(tmp_path / name), *tiny_options(gpt2.tiny),
                         "--batch-size", size, "--no-progress"]) == 0
    one, batched = (summarize_adapter(tmp_path / name) for name in ("one", "batched"))
    assert one["num_keys"] == batched["num_keys"] > 0
    assert [m["distinct_edit_ids"] for m in one["modules"].values()] == \
        [m["distinct_edit_ids"] for m in batched["modules"].values()]


# ---------------------------------------------------------------------------------------------- calibrate
def test_calibrate_saves_an_empty_calibrated_adapter_that_edit_continues(gpt2, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(WORDS[5 + (i * 7 + j * 3) % 40] for j in range(2 + i % 5)) for i in range(30)))
    folder = str(tmp_path / "calibrated")
    code, out, _ = run_cli(capsys, "calibrate", gpt2.model, "-o", folder, "--layer", "1", "--key", "prompt_mean",
                           "--key-layer", "0", "--eps-split", "keep", "--texts", str(texts), "--no-progress")
    assert code == 0 and "on 30 background texts" in out
    config = adapter_files.read_adapter_config(folder)
    expected = calibrate(PeftModel.from_pretrained(gpt2.tiny.fresh(), folder), gpt2.tiny.tokenizer,
                         texts.read_text().splitlines(), progress=False)
    assert config["eps_init"] == pytest.approx(expected.eps_init)
    assert (config["key"], config["key_module"], config["eps_split"]) == ("prompt_mean", "transformer.h.0.mlp.c_proj",
                                                                           "keep")
    assert summarize_adapter(folder)["num_keys"] == 0
    edited = str(tmp_path / "edited")
    assert run_cli(capsys, "edit", gpt2.model, gpt2.edits, "-o", edited, "--adapter", folder, "--no-progress")[0] == 0
    assert summarize_adapter(edited)["num_keys"] >= 1
    assert adapter_files.read_adapter_config(edited)["eps_init"] == config["eps_init"]


@pytest.mark.parametrize("argv, message", [
    (["--false-hit-rate", "2"], "--false-hit-rate must be between 0 and 1"),
    (["--texts", "missing.txt"], "cannot read --texts"),
    (["--key-layer", "9"], "layer 9 is out of range"),
])
def test_calibrate_input_errors_exit_2_with_one_line(gpt2, tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "calibrate", gpt2.model, "-o", str(tmp_path / "a"), "--no-progress", *argv)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_edit_without_a_measured_radius_says_how_to_measure_one(gpt2, tmp_path, capsys):
    argv = ["edit", gpt2.model, gpt2.edits, "--limit", "1", "--max-steps", "1", "--no-progress"]
    code, _, err = run_cli(capsys, *argv, "-o", str(tmp_path / "a"))
    assert code == 0
    assert f"grace-peft calibrate {gpt2.model} -o DIR" in err and "eps_init is 1.0" in err
    code, _, err = run_cli(capsys, *argv, "-o", str(tmp_path / "b"), "--eps-init", "0.5")
    assert code == 0 and "calibrate" not in err


def test_value_contexts_option_reaches_the_saved_config(gpt2, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "edit", gpt2.model, gpt2.edits, "-o", str(tmp_path / "a"), "--limit", "1",
                         "--value-contexts", "2", "--no-progress", *tiny_options(gpt2.tiny))
    assert code == 0
    assert adapter_files.read_adapter_config(tmp_path / "a")["value_contexts"] == 2


# ---------------------------------------------------------------------------------------------- convert-gguf
@pytest.mark.parametrize("setup, message", [
    (lambda t: (str(t / "missing.gguf"), str(t / "out")), "No GGUF file at"),
    (lambda t: (str(t / "missing.gguf"), str(t)), "already holds something else than a checkpoint"),
])
def test_convert_gguf_input_errors_exit_2_with_one_line(tmp_path, capsys, setup, message):
    (tmp_path / "occupant.txt").write_text("mine")
    source, output = setup(tmp_path)
    code, _, err = run_cli(capsys, "convert-gguf", source, "-o", output)
    assert code == 2 and message in err and err.count("\n") == 1
    assert (tmp_path / "occupant.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_convert_gguf_keeps_an_existing_checkpoint_folder(gpt2, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "convert-gguf", str(tmp_path / "missing.gguf"), "-o", gpt2.model)
    assert code == 0 and f"checkpoint folder {gpt2.model}" in out
