"""Key functions on plain tensors, and the SPLIT rule that keeps radii (grace_peft.keys, grace_peft.codebook)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODELS, apply_edits, batch_logits, wrap
from peft import PeftModel

from grace_peft.codebook import Codebook, CodebookOperation
from grace_peft.keys import compute_keys, prompt_mean, unit


def padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of different lengths in one batch: (inputs, query positions, first positions)."""
    length = max(len(row) for row in rows)
    inputs = torch.full((len(rows), length, rows[0].shape[-1]), 1e6)  # padding far from anything real
    positions, starts = [], []
    for index, row in enumerate(rows):
        start = length - len(row) if side == "left" else 0
        inputs[index, start:start + len(row)] = row
        starts.append(start)
        positions.append(start + len(row) - 1)
    return inputs, torch.tensor(positions), torch.tensor(starts)


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_mean_averages_exactly_the_prompt_tokens_whatever_the_padding(side):
    torch.manual_seed(0)
    rows = [torch.randn(3, 4), torch.randn(5, 4)]
    inputs, positions, starts = padded(rows, side)
    expected = torch.stack([row.mean(0) for row in rows])
    torch.testing.assert_close(prompt_mean(inputs, positions, starts), expected)
    center = torch.randn(4)
    torch.testing.assert_close(compute_keys("prompt_mean", inputs, positions, starts, center),
                               unit(expected - center))
    last = compute_keys("last_token", inputs, positions, starts)
    assert torch.equal(last, torch.stack([row[-1] for row in rows]))


def test_prompt_mean_stops_at_the_query_position_and_ignores_what_follows():
    torch.manual_seed(0)
    prompt, target = torch.randn(4, 8), torch.randn(2, 8)
    sequence = torch.cat([prompt, target]).unsqueeze(0)  # teacher forcing: target tokens after the query
    keys = compute_keys("prompt_mean", sequence, torch.tensor([3]), None)
    torch.testing.assert_close(keys, unit(prompt.mean(0, keepdim=True)))
    assert torch.allclose(keys.norm(dim=-1), torch.ones(1))


def test_unit_keys_turn_euclidean_radii_into_cosine_thresholds():
    a, b = unit(torch.randn(2, 16)).unbind()
    assert torch.isclose((a - b).norm(), torch.sqrt(2 - 2 * (a @ b)), atol=1e-6)
    assert torch.equal(unit(torch.zeros(1, 3)), torch.zeros(1, 3))


def test_an_unknown_key_function_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="last_token, prompt_mean"):
        compute_keys("first_token", torch.zeros(1, 2, 3), torch.tensor([1]), None)


@pytest.mark.parametrize("rule, radii", [("halve", [0.5, 0.5]), ("keep", [2.0, 2.0])])
def test_split_halves_both_radii_or_keeps_them_and_the_nearest_key_decides(rule, radii):
    codebook = Codebook(2, 1, eps_init=2.0, split_rule=rule)
    codebook.update(torch.tensor([0.0, 0.0]), torch.tensor([1]), edit_id=0, init_value=torch.zeros(1))
    update = codebook.update(torch.tensor([1.0, 0.0]), torch.tensor([2]), edit_id=1, init_value=torch.ones(1))
    assert update.operation is CodebookOperation.SPLIT
    assert codebook.radii.tolist() == radii
    probes = torch.tensor([[0.4, 0.0], [0.6, 0.0], [0.5, 1.5], [0.0, 1.9], [4.0, 0.0]])
    expected = {"halve": [0, 1, -1, -1, -1], "keep": [0, 1, 0, 0, -1]}[rule]  # (0.5, 1.5): a tie goes to the older
    assert codebook.lookup(probes).tolist() == expected


def test_a_saved_key_center_is_checked_and_loaded():
    saved = Codebook(3, 1, eps_init=1.0, key_center=True)
    saved.key_center.copy_(torch.tensor([1.0, 2.0, 3.0]))
    loaded = Codebook(3, 1, eps_init=1.0, key_center=True)
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.key_center, saved.key_center)
    broken = saved.state_dict() | {"key_center": torch.tensor([1.0, float("nan"), 0.0])}
    with pytest.raises(ValueError, match="'key_center' holds NaN"):
        Codebook(3, 1, eps_init=1.0, key_center=True).load_state_dict(broken)
    with pytest.raises(ValueError, match="'key_center' has shape"):
        Codebook(3, 1, eps_init=1.0, key_center=True).load_state_dict(saved.state_dict() |
                                                                      {"key_center": torch.zeros(4)})
    assert "key_center" not in Codebook(3, 1, eps_init=1.0).state_dict()  # the paper's key saves as before


def test_an_adapter_saved_before_the_key_options_loads_and_answers_as_before(tmp_path):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    apply_edits(model, tm, [("the capital of australia is", "canberra"), ("who leads apple", "paris")])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for field in ("key", "key_module", "eps_split", "save_id"):  # what the earlier release wrote lacked these
        del config[field]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    again = PeftModel.from_pretrained(tm.fresh(), tmp_path)
    loaded = again.peft_config["default"]
    assert (loaded.key, loaded.key_module, loaded.eps_split) == ("last_token", None, "halve")
    assert torch.equal(batch_logits(again, tm), batch_logits(model, tm))
