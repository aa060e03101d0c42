"""Optimizers for one edit's value: a vector of a few hundred numbers, trained for a handful of steps.

PEFT-free. :class:`LineSearch` needs no learning rate in the layer's units: its steps follow the normalized gradient
and their length starts as a fraction of the value's own norm, then doubles after every step that lowers the loss
and halves after every one that does not (the rejected point is left for the best one so far). Adam moves every
coordinate by about its learning rate per step, so its rate has to match the scale of the layer's outputs, which
differs between models and layers (and does not matter at all where a norm follows the layer, as in Gemma 3).
"""

from __future__ import annotations

import torch


class LineSearch:
    """Normalized gradient steps with a step length that adapts: ``step(loss)`` after each backward pass.

    ``params``: the tensors of one value (they are evaluated, then moved, in place). ``relative_step``: the first
    step's length as a fraction of the parameters' norm (1.0 where that norm is zero)."""

    def __init__(self, params: list[torch.Tensor], relative_step: float) -> None:
        self.params = params
        scale = float(torch.cat([param.detach().flatten() for param in params]).norm())
        self.length = relative_step * (scale if scale > 0 else 1.0)
        self._best: tuple[float, list[torch.Tensor], list[torch.Tensor]] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, loss: float) -> None:
        """Take the point just evaluated (its ``loss``, its gradients in ``.grad``) into account and move the
        parameters to the next point to evaluate."""
        grads = [torch.zeros_like(param) if param.grad is None else param.grad for param in self.params]
        usable = all(bool(torch.isfinite(grad).all()) for grad in grads) and loss == loss
        if self._best is None or (usable and loss < self._best[0]):
            if self._best is not None:
                self.length *= 2
            if usable:
                self._best = (loss, [param.detach().clone() for param in self.params],
                              [grad.detach().clone() for grad in grads])
        else:
            self.length /= 2
        if self._best is None:  # the first point gave no usable gradient: stay there
            return
        _, values, best_grads = self._best
        norm = float(torch.cat([grad.flatten() for grad in best_grads]).norm())
        if norm == 0:
            return
        for param, value, grad in zip(self.params, values, best_grads, strict=True):
            param.copy_(value - (self.length / norm) * grad)
