"""The contract every GRACE configuration keeps with peft and transformers, on every tiny model (peft's own test
matrix, in small): edits change the outputs; save and load (also with low_cpu_mem_usage) give them back bit for bit;
disable_adapter and unload give the base model; a second adapter is independent, switchable and deletable; merging
is refused; greedy generation is the same with and without the KV cache.

A new option (a key function, a replacement mode, an expansion rule) gets the whole contract by adding a row to
``CASES``: the model kind and the GraceConfig fields that differ from that model's defaults (``conftest``).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    FAR_PROMPT,
    NEAR_PROMPTS,
    PAD,
    TINY_MODELS,
    apply_edits,
    batch_logits,
    codebook_of,
    target_for,
    wrap,
)
from peft import PeftModel
from safetensors.torch import load_file

from grace_peft import GraceConfig, GraceLayer

CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2-replace_all": ("gpt2", {"replacement": "replace_all"}),
    "gpt2-replace_prompt": ("gpt2", {"replacement": "replace_prompt"}),
    "gpt2-cold-values": ("gpt2", {"value_init": "cold"}),
    "gpt2-paper-expansion": ("gpt2", {"eps_expand": "paper"}),
    "llama": ("llama", {}),
    "llama-replace_all": ("llama", {"replacement": "replace_all"}),
    "llama-moving-average": ("llama", {"eps_expand": "moving_average"}),
    "t5": ("t5", {}),
    "bert": ("bert", {}),
    "gpt2-prompt-mean": ("gpt2", {"key": "prompt_mean", "eps_split": "keep", "eps_init": 0.3}),
    "llama-prompt-mean": ("llama", {"key": "prompt_mean", "eps_split": "keep", "eps_init": 0.3}),
    "t5-prompt-mean": ("t5", {"key": "prompt_mean", "eps_init": 0.3}),
    "bert-prompt-mean": ("bert", {"key": "prompt_mean", "eps_split": "keep", "eps_init": 0.3}),
    "gpt2-key-module": ("gpt2", {"key": "prompt_mean", "eps_split": "keep", "eps_init": 0.3,
                                 "key_module": "transformer.h.0.mlp.c_proj"}),
    "llama-key-module": ("llama", {"key": "prompt_mean", "eps_split": "keep", "eps_init": 0.3,
                                   "key_module": "model.layers.0.mlp.down_proj"}),
    "t5-key-module": ("t5", {"key": "prompt_mean", "eps_init": 0.3,
                             "key_module": "encoder.block.0.layer.1.DenseReluDense.wo"}),
}
GRACE_SETTINGS = ("target_modules", "key", "key_module", "eps_init", "eps_expand", "eps_split", "replacement",
                  "value_init", "learning_rate", "max_steps", "early_stop", "stop_loss", "skip_if_correct", "seed")
SAVED_TENSORS = {"keys", "values", "radii", "label_tokens", "label_lengths", "edit_ids", "next_edit_id",
                 "gate_tokens", "gate_lengths", "gate_owners",
                 *(f"journal_{table}" for table in ("fields", "numbers", "target_tokens", "label_tokens_before", "text",
                                                     "values", "keys"))}


@pytest.fixture(params=list(CASES))
def case(request):
    """(tiny model, its config overrides, a new model holding two overlapping edits and one far edit)."""
    kind, overrides = CASES[request.param]
    tm = TINY_MODELS[kind]()
    model = wrap(tm, **overrides)
    far_target = 1 if kind == "bert" else "paris"
    apply_edits(model, tm, [(NEAR_PROMPTS[0], target_for(kind)), (NEAR_PROMPTS[1], target_for(kind)),
                            (FAR_PROMPT, far_target)], must_take=False)
    assert len(codebook_of(model)) >= 2, "setup: the edits made no entries"
    assert not torch.equal(batch_logits(model, tm), batch_logits(tm.fresh(), tm)), "setup: the edits changed nothing"
    return tm, overrides, model


def assert_same_codebook(a, b) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_and_load_give_back_outputs_and_codebook_bit_for_bit(case, tmp_path, low_cpu_mem_usage):
    tm, _, model = case
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    centered = model.peft_config["default"].key == "prompt_mean"
    assert {key.rsplit(".", 1)[1] for key in tensors} == SAVED_TENSORS | ({"key_center"} if centered else set())
    assert all(".grace_codebook." in key for key in tensors)

    again = PeftModel.from_pretrained(tm.fresh(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_same_codebook(codebook_of(model), codebook_of(again))
    assert torch.equal(batch_logits(again, tm), batch_logits(model, tm))
    settings = [{name: getattr(config, name) for name in GRACE_SETTINGS}
                for config in (model.peft_config["default"], again.peft_config["default"])]
    assert settings[0] == settings[1]


def test_disable_adapter_gives_the_base_model(case):
    tm, _, model = case
    base = batch_logits(tm.fresh(), tm)
    with model.disable_adapter():
        assert torch.equal(batch_logits(model, tm), base)
    assert not torch.equal(batch_logits(model, tm), base)


def test_a_second_adapter_is_independent_switchable_and_deletable(case, tmp_path):
    tm, overrides, model = case
    edited_outputs = batch_logits(model, tm)
    settings = {"target_modules": [tm.target], "replacement": tm.replacement, "eps_init": tm.eps_init, **overrides}
    model.add_adapter("other", GraceConfig(**settings))
    model.set_adapter("other")
    assert torch.equal(batch_logits(model, tm), batch_logits(tm.fresh(), tm))  # "other" is still empty
    apply_edits(model, tm, [(NEAR_PROMPTS[0], 0 if tm.kind == "bert" else "rome")], must_take=False)
    assert len(codebook_of(model, "other")) == 1 and len(codebook_of(model, "default")) >= 2
    other_outputs = batch_logits(model, tm)

    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tm.fresh(), tmp_path / "other", adapter_name="other")
    assert_same_codebook(codebook_of(model, "other"), codebook_of(again, "other"))
    assert torch.equal(batch_logits(again, tm), other_outputs)

    model.set_adapter("default")
    assert torch.equal(batch_logits(model, tm), edited_outputs)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert all("other" not in m.grace_codebook for m in model.modules() if isinstance(m, GraceLayer))
    assert torch.equal(batch_logits(model, tm), edited_outputs)


def test_merge_is_refused_and_unload_gives_the_clean_base(case):
    tm, _, model = case
    with pytest.raises(NotImplementedError, match="lookup table"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="lookup table"):
        model.merge_adapter()
    base = model.unload()
    assert not any(isinstance(module, GraceLayer) for module in base.modules())
    assert not any("grace_" in key for key in base.state_dict())
    assert "generate" not in base.__dict__
    hooked = base.get_encoder() if tm.kind == "t5" else base
    assert not hooked._forward_pre_hooks and not hooked._forward_hooks
    assert torch.equal(batch_logits(base, tm), batch_logits(tm.fresh(), tm))


def test_greedy_generation_is_the_same_with_and_without_the_cache(case):
    tm, _, model = case
    if tm.kind == "bert":
        pytest.skip("a sequence classifier does not generate")
    for prompt in (NEAR_PROMPTS[0], FAR_PROMPT):
        inputs = dict(tm.tokenizer(prompt, return_tensors="pt"))
        with torch.no_grad():
            cached, uncached = (model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                                               pad_token_id=PAD) for use_cache in (True, False))
        assert cached.tolist() == uncached.tolist(), prompt
