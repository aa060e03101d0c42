"""The line search that trains a value without a learning rate in the layer's units (plain tensors, no PEFT)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, wrap

from grace_peft import GraceConfig, GraceEditor
from grace_peft.optimizers import LineSearch


def evaluate(params: list[torch.Tensor], loss_of) -> float:
    """One 'forward and backward' at the parameters' current point; returns the loss."""
    for param in params:
        param.grad = None
    loss = loss_of(params)
    loss.backward()
    return float(loss.detach())


def test_steps_follow_the_normalized_gradient_from_a_fraction_of_the_norm():
    x = torch.tensor([3.0, 4.0], requires_grad=True)  # norm 5
    search = LineSearch([x], relative_step=0.2)
    loss = evaluate([x], lambda p: (p[0] ** 2).sum())  # gradient (6, 8): direction (0.6, 0.8)
    search.step(loss)
    assert torch.allclose(x.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))  # a step of 0.2 * 5 = 1


def test_length_doubles_after_progress_and_halves_back_from_a_worse_point():
    target = torch.tensor([10.0, 0.0])
    x = torch.tensor([1.0, 0.0], requires_grad=True)
    search = LineSearch([x], relative_step=1.0)

    def loss_of(p):
        return ((p[0] - target) ** 2).sum()

    search.step(evaluate([x], loss_of))  # first point: step 1 towards the target
    assert x.tolist() == [2.0, 0.0]
    search.step(evaluate([x], loss_of))  # progress: length 2 from the new best
    assert x.tolist() == [4.0, 0.0]
    search.step(evaluate([x], loss_of))
    assert x.tolist() == [8.0, 0.0]
    search.step(evaluate([x], loss_of))  # 8 -> 16 overshoots to loss 36 > 4: next time back at 8, half the length
    assert x.tolist() == [16.0, 0.0]
    search.step(evaluate([x], loss_of))
    assert x.tolist() == [12.0, 0.0]
    search.step(evaluate([x], loss_of))  # 12 is worse than 8 as well (4 = 4 is no progress)
    assert x.tolist() == [10.0, 0.0]


def test_a_zero_value_starts_with_steps_of_one_and_a_broken_gradient_is_a_failed_step():
    x = torch.zeros(2, requires_grad=True)
    search = LineSearch([x], relative_step=0.5)
    search.step(evaluate([x], lambda p: ((p[0] - torch.tensor([0.0, 3.0])) ** 2).sum()))
    assert x.tolist() == [0.0, 0.5]
    x.grad = torch.tensor([float("nan"), 0.0])
    search.step(float("nan"))  # rejected: back to the best point with half the length
    assert x.tolist() == [0.0, 0.25]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5", "bert"])
def test_line_search_edits_take_on_every_model_family(kind):
    tm = TINY_MODELS[kind]()
    model = wrap(tm, optimizer="line_search", value_init="cold")
    editor = GraceEditor(model, tm.tokenizer, progress=False)
    target = 2 if kind == "bert" else "paris"
    reports = editor.edit_many([("the capital of australia is", target), ("who leads apple", target)], batch_size=2)
    assert all(report.success and 0 < report.steps < 20 for report in reports)


@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "sgd", "optimizer must be one of 'adam', 'line_search'"),
    ("line_search_step", 0.0, "line_search_step must be positive"),
    ("line_search_step", float("inf"), "line_search_step must be positive"),
])
def test_optimizer_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        GraceConfig(target_modules=["x"], **{field: value})
