"""GRACE as a PEFT method beyond the per-model contract (test_contract.py): registration, config round trip,
saving and loading in special cases (empty, large, other shapes, low memory, transformers' loader), errors."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAR_PROMPT, NEAR_PROMPTS, TINY_MODELS, apply_edits, batch_logits, codebook_of, wrap
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType

import grace_peft
from grace_peft import CodebookShapeError, GraceConfig, GraceEditor


def near_edits(tm, prompts=NEAR_PROMPTS, **overrides):
    """A new model of ``tm`` with the two overlapping NEAR_PROMPTS edited (a split or an expand)."""
    model = wrap(tm, **overrides)
    targets = [1, 2] if tm.kind == "bert" else ["canberra", "london"]
    apply_edits(model, tm, zip(prompts, targets, strict=False), must_take=False)
    return model


# ---------------------------------------------------------------------------------------------- registration
def test_registration_is_a_real_peft_type_and_idempotent():
    assert PeftType.GRACE.value == "GRACE"
    importlib.reload(grace_peft)
    importlib.reload(grace_peft)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.GRACE] == "grace_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GRACE].__name__ == "GraceConfig"
    # peft's and transformers' methods are wrapped once, whatever the number of imports
    from transformers.integrations import PeftAdapterMixin

    for method in (PeftModel.push_to_hub, PeftModel.from_pretrained.__func__, PeftModel.load_adapter,
                   PeftAdapterMixin.load_adapter):
        original = method.grace_peft_original
        assert not hasattr(original, "grace_peft_original") and original.__module__.split(".")[0] != "grace_peft"


LOAD_WITHOUT_IMPORT = """
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
config = GPT2Config(**{config!r})
torch.manual_seed(0)
base = GPT2LMHeadModel(config).eval()
ids = torch.tensor([{ids!r}])
{load}
print(int(model(ids).logits[0, -1].argmax()), "grace_peft" in sys.modules)
"""
LOADERS = {
    "peft": "from peft import PeftModel\nmodel = PeftModel.from_pretrained(base, {folder!r})",
    "transformers": "base.load_adapter({folder!r})\nmodel = base",  # peft is imported inside transformers
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_an_adapter_loads_without_import_grace_peft(tmp_path, loader):
    """Installing grace_peft registers GRACE when peft is first imported (grace_peft_autoload.pth), so pipelines that
    never import grace_peft load GRACE adapters and get the edited answers."""
    tm = TINY_MODELS["gpt2"]()
    model = near_edits(tm)
    model.save_pretrained(tmp_path)
    ids = tm.tokenizer(NEAR_PROMPTS[0])["input_ids"]
    with torch.no_grad():
        edited = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    assert edited == tm.tokenizer.convert_tokens_to_ids("canberra")
    code = LOAD_WITHOUT_IMPORT.format(config=tm.fresh().config.to_dict(), ids=ids,
                                      load=LOADERS[loader].format(folder=str(tmp_path)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(edited), "True"]
    switched_off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "GRACE_PEFT_AUTOLOAD": "0"})
    assert switched_off.returncode != 0 and "GRACE" in switched_off.stderr.splitlines()[-1]


def test_python_start_up_imports_neither_peft_nor_grace_peft():
    code = "import sys, _grace_peft_autoload; print(*(name in sys.modules for name in ('peft', 'grace_peft', 'torch')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "False", "False"]


def test_config_round_trips_through_adapter_config_json(tmp_path):
    config = GraceConfig(target_modules=["h.1.mlp.c_proj"], eps_init=0.5, eps_expand="moving_average",
                         replacement="replace_all", value_init="cold", learning_rate=0.3, max_steps=7,
                         early_stop="loss", stop_loss=0.05, skip_if_correct=True, seed=11)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GraceConfig)
    assert loaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "GRACE"


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("eps_init", 0.0, "eps_init"),
        ("eps_init", float("nan"), "eps_init"),
        ("eps_expand", "grow", "grow"),
        ("replacement", "replace_first", "replacement"),
        ("value_init", "hot", "value_init"),
        ("early_stop", "sometimes", "early_stop"),
        ("max_steps", 0, "max_steps"),
        ("learning_rate", -1.0, "learning_rate"),
        ("target_modules", [], "empty"),
    ],
)
def test_config_rejects_bad_values(field, value, phrase):
    with pytest.raises(ValueError, match=phrase):
        GraceConfig(**{"target_modules": ["x"], field: value})


def test_target_modules_accepts_names_suffixes_and_regex():
    tm = TINY_MODELS["gpt2"]()
    for target in (["transformer.h.1.mlp.c_proj"], ["h.1.mlp.c_proj"], r".*h\.1\.mlp\.c_proj"):
        model = get_peft_model(tm.fresh(), GraceConfig(target_modules=target))
        assert model.base_model.targeted_module_names == ["transformer.h.1.mlp.c_proj"]


def test_wrong_target_name_is_a_clear_error():
    tm = TINY_MODELS["llama"]()
    with pytest.raises(ValueError, match=r"matched no module.*model\.layers\.1\.mlp\.down_proj"):
        get_peft_model(tm.fresh(), GraceConfig(target_modules=["model.layers.1.mlp.down_prj"]))
    with pytest.raises(ValueError, match="needs target_modules"):
        get_peft_model(tm.fresh(), GraceConfig())


def test_unsupported_module_type_is_a_clear_error():
    tm = TINY_MODELS["llama"]()
    with pytest.raises(TypeError, match="wraps nn.Linear.*'model.layers.1.mlp' is a LlamaMLP"):
        get_peft_model(tm.fresh(), GraceConfig(target_modules=["model.layers.1.mlp"]))


def test_t5_decoder_target_is_refused():
    tm = TINY_MODELS["t5"]()
    with pytest.raises(NotImplementedError, match="decoder of an encoder-decoder"):
        get_peft_model(tm.fresh(), GraceConfig(target_modules=["decoder.block.1.layer.2.DenseReluDense.wo"]))


# ---------------------------------------------------------------------------------------------- save / load
def test_empty_codebook_round_trips(tmp_path):
    tm = TINY_MODELS["gpt2"]()
    wrap(tm).save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tm.fresh(), tmp_path)
    assert len(codebook_of(again)) == 0
    assert torch.equal(batch_logits(again, tm), batch_logits(tm.fresh(), tm))


def test_large_codebook_round_trips(tmp_path):
    """Whatever its size: fill a codebook with 2,000 synthetic entries and reload it."""
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    book = codebook_of(model)
    generator = torch.Generator().manual_seed(0)
    for edit_id in range(2000):
        book.update(torch.randn(book.key_dim, generator=generator) * 10, [edit_id % 7, 3],
                    edit_id=edit_id, init_value=torch.randn(book.value_dim, generator=generator))
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tm.fresh(), tmp_path)
    for name, tensor in book.state_dict().items():
        assert torch.equal(tensor, codebook_of(again).state_dict()[name]), name


def test_load_into_other_shapes_names_module_and_both_shapes(tmp_path):
    tm = TINY_MODELS["gpt2"]()
    near_edits(tm).save_pretrained(tmp_path)
    other = tm.fresh().config
    other.n_inner = 256  # the target's input width: 128 -> 256
    from transformers import GPT2LMHeadModel

    shape_error = r"'base_model\.model\.transformer\.h\.1\.mlp\.c_proj'.*\(2, 128\).*256"
    with pytest.raises(CodebookShapeError, match=shape_error):
        PeftModel.from_pretrained(GPT2LMHeadModel(other), tmp_path)


def test_low_cpu_mem_usage_load_and_bf16_base_keep_fp32_codebook(tmp_path):
    tm = TINY_MODELS["llama"]()
    model = near_edits(tm)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tm.fresh().to(torch.bfloat16), tmp_path, low_cpu_mem_usage=True)
    book = codebook_of(again)
    assert book.keys.dtype == book.values.dtype == book.radii.dtype == torch.float32
    assert torch.equal(book.values, codebook_of(model).values)
    assert batch_logits(again, tm).dtype == torch.bfloat16


# the journal of two ADDs with one-token targets: two records, no changed values or keys, no text
TWO_EDITS_JOURNAL = {"records": 2, "target_tokens": 2, "label_tokens_before": 0, "text": 0, "values": 0, "keys": 0}


def test_saving_records_codebook_sizes_in_the_file_not_in_the_live_config(tmp_path):
    tm = TINY_MODELS["gpt2"]()
    model = near_edits(tm)
    config = model.peft_config["default"]
    before = {key: value for key, value in config.to_dict().items() if key != "base_model_name_or_path"}
    model.save_pretrained(tmp_path)
    after = {key: value for key, value in config.to_dict().items() if key != "base_model_name_or_path"}
    assert after == before and config.codebook_sizes == {}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["codebook_sizes"] == {"transformer.h.1.mlp.c_proj": {"size": 2, "label_size": 2, "gate_size": [0, 0],
                                                                      "journal": TWO_EDITS_JOURNAL}}
    again = PeftModel.from_pretrained(tm.fresh(), tmp_path)
    assert torch.equal(batch_logits(again, tm), batch_logits(model, tm))


def test_peft_config_and_auto_peft_model_loading(tmp_path):
    tm = TINY_MODELS["llama"]()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tm.fresh().save_pretrained(base_dir)
    model = near_edits(tm)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    config = PeftConfig.from_pretrained(adapter_dir)
    assert config.codebook_sizes == {"model.layers.1.mlp.down_proj": {"size": 2, "label_size": 2, "gate_size": [0, 0],
                                                                     "journal": TWO_EDITS_JOURNAL}}
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert torch.equal(batch_logits(auto.eval(), tm), batch_logits(model, tm))


def test_transformers_load_adapter(tmp_path):
    tm = TINY_MODELS["gpt2"]()
    model = near_edits(tm)
    model.save_pretrained(tmp_path)
    plain = tm.fresh()
    plain.load_adapter(str(tmp_path))
    assert torch.equal(batch_logits(plain, tm), batch_logits(model, tm))


def test_failed_config_write_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    tm = TINY_MODELS["gpt2"]()
    model = near_edits(tm)
    model.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    GraceEditor(model, tm.tokenizer, progress=False).edit(FAR_PROMPT, "paris")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    # Nothing was moved in before the failure: the folder is the previous version, file for file, with no staging
    # folder left behind (tests/test_saving.py kills saves at every point).
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert len(codebook_of(PeftModel.from_pretrained(tm.fresh(), tmp_path))) == len(codebook_of(model)) - 1


# ---------------------------------------------------------------------------------------------- adapters
def test_layer_status_and_trainable_parameters(capsys):
    tm = TINY_MODELS["llama"]()
    model = near_edits(tm)
    (status,) = model.get_layer_status()
    assert status.name == "model.model.layers.1.mlp.down_proj" and status.module_type == "grace.Linear"
    assert status.active_adapters == ["default"] and status.merged_adapters == []
    model.print_trainable_parameters()
    trainable = int(capsys.readouterr().out.split("trainable params: ")[1].split(" ")[0].replace(",", ""))
    assert trainable == 2 * 32  # two values of the layer's output width
