"""Calibration: the radius and key center measured on background text (grace_peft.calibration)."""

from __future__ import annotations

import pytest
import torch
from conftest import EDITS, TINY_MODELS, WORDS, apply_edits, codebook_of, wrap
from peft import PeftModel

from grace_peft.background import background_texts
from grace_peft.calibration import apply_calibration, calibrate

TEXTS = [" ".join(WORDS[5 + (index * 7 + step * 3) % (len(WORDS) - 5)] for step in range(2 + index % 5))
         for index in range(40)]


def pooled_by_hand(tm, texts, module_name: str, kind: str) -> torch.Tensor:
    """The inputs of ``module_name`` in the unwrapped base model: last token, or mean over the text's tokens."""
    base = tm.fresh()
    seen = []
    handle = base.get_submodule(module_name).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for text in texts:
            base(**tm.tokenizer(text, return_tensors="pt"))
    handle.remove()
    return torch.stack([inputs[0, -1] if kind == "last_token" else inputs[0].mean(0) for inputs in seen])


@pytest.mark.parametrize("kind", ["last_token", "prompt_mean"])
def test_the_radius_is_the_quantile_of_nearest_background_distances(kind):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm, key=kind)
    calibration = calibrate(model, tm.tokenizer, TEXTS, false_hit_rate=0.1, progress=False)
    pooled = pooled_by_hand(tm, TEXTS, "transformer.h.1.mlp.c_proj", kind)
    if kind == "prompt_mean":
        center = pooled.mean(0)
        torch.testing.assert_close(calibration.key_centers["transformer.h.1.mlp.c_proj"], center)
        keys = torch.nn.functional.normalize(pooled - center, dim=-1)
    else:
        assert calibration.key_centers == {}
        keys = pooled
    distances = torch.cdist(keys, keys).fill_diagonal_(float("inf")).min(-1).values
    (measured,) = calibration.nearest_distances.values()
    torch.testing.assert_close(torch.tensor(measured), distances.sort().values, rtol=1e-4, atol=1e-5)
    assert calibration.eps_init == pytest.approx(float(distances.quantile(0.1)), rel=1e-4)
    assert calibration.texts == len(TEXTS) and calibration.false_hit_rate == 0.1


def test_a_key_module_is_calibrated_on_its_own_inputs():
    tm = TINY_MODELS["llama"]()
    model = wrap(tm, key="prompt_mean", key_module="model.layers.0.mlp.down_proj")
    calibration = calibrate(model, tm.tokenizer, TEXTS, progress=False)
    center = pooled_by_hand(tm, TEXTS, "model.layers.0.mlp.down_proj", "prompt_mean").mean(0)
    torch.testing.assert_close(calibration.key_centers[tm.target], center)


def test_applying_a_calibration_sets_radius_and_center_and_they_survive_a_save(tmp_path):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm, key="prompt_mean", eps_split="keep")
    calibration = calibrate(model, tm.tokenizer, TEXTS, progress=False)
    apply_calibration(model, calibration)
    codebook = codebook_of(model)
    assert model.peft_config["default"].eps_init == codebook.eps_init == calibration.eps_init
    (center,) = calibration.key_centers.values()
    assert torch.equal(codebook.key_center, center)
    apply_edits(model, tm, EDITS[:1])
    assert codebook.radii.tolist() == [pytest.approx(calibration.eps_init)]
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tm.fresh(), tmp_path)
    assert torch.equal(codebook_of(again).key_center, center)
    assert again.peft_config["default"].eps_init == calibration.eps_init
    with pytest.raises(ValueError, match="Calibrate before editing"):
        apply_calibration(model, calibration)


def test_background_texts_are_the_models_own_seeded_and_leave_the_callers_rng_alone():
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = background_texts(model, tm.tokenizer, 8, max_new_tokens=4, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == background_texts(model, tm.tokenizer, 8, max_new_tokens=4, progress=False)
    assert first != background_texts(model, tm.tokenizer, 8, max_new_tokens=4, seed=1, progress=False)
    assert len(first) == 8 and all(len(text.split()) > 1 for text in first)


@pytest.mark.parametrize("texts, rate, message", [
    (TEXTS[:5], 0.01, "at least 20 different background texts"),
    (TEXTS[:10] * 3, 0.01, "at least 20 different background texts"),
    (TEXTS, 0.0, "between 0 and 1"),
    (TEXTS, 1.5, "between 0 and 1"),
])
def test_bad_calibration_input_is_refused(texts, rate, message):
    tm = TINY_MODELS["gpt2"]()
    with pytest.raises(ValueError, match=message):
        calibrate(wrap(tm), tm.tokenizer, texts, false_hit_rate=rate, progress=False)
