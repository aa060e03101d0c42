"""Reuse the output of the frozen layers below the edited one while an edit trains (spec §3).

Training a value runs the same input through the model many times, and nothing below the lowest edited layer
changes in between. :func:`replay_frozen_blocks` finds the transformer blocks below it (the entries of the
``nn.ModuleList`` that holds the edited layers), records their outputs on the first forward pass and makes every
later pass return those recordings instead of recomputing them. The replayed tensors are the exact tensors the
blocks computed, so training sees bit-identical activations, only sooner.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


def blocks_below(model: nn.Module, module_names: list[str]) -> list[nn.Module]:
    """The blocks strictly below the lowest of ``module_names`` (names relative to ``model``), taken from the
    outermost ``nn.ModuleList`` that holds all of them; empty when no such list exists."""
    for list_name, blocks in model.named_modules():
        if not list_name or not isinstance(blocks, nn.ModuleList):
            continue
        prefix = f"{list_name}."
        heads = [name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else "" for name in module_names]
        if heads and all(head.isdigit() for head in heads):
            return list(blocks[: min(int(head) for head in heads)])
    return []


class Replay:
    """The recordings of one :func:`replay_frozen_blocks` context, per block position."""

    def __init__(self) -> None:
        self.recorded: dict[int, Any] = {}

    def keep_rows(self, rows: Tensor, batch: int) -> None:
        """From now on replay only these rows (in this order) of the ``batch`` rows so far: the training batch has
        dropped the others. Tensors that do not have one row per batch row (a shared position bias) stay whole."""
        self.recorded = {position: _select_rows(output, rows, batch) for position, output in self.recorded.items()}


@contextmanager
def replay_frozen_blocks(blocks: list[nn.Module]) -> Iterator[Replay]:
    """Record each block's output on the first forward pass inside the context, replay it on later passes.

    Only valid while every pass gets the same inputs (or the rows that :meth:`Replay.keep_rows` kept) and nothing in
    ``blocks`` changes (true during one edit)."""
    replay = Replay()
    handles = []
    previous_forward = {}

    def replaying_forward(position: int):
        def forward(*args, **kwargs):
            return _clone_tensors(replay.recorded[position])
        return forward

    def record(position: int):
        def hook(module: nn.Module, args, output):
            replay.recorded[position] = _clone_tensors(output)
            if len(replay.recorded) == len(blocks):  # first pass complete: switch every block to replay
                for block_position, block in enumerate(blocks):
                    previous_forward[block_position] = block.__dict__.get("forward")
                    block.forward = replaying_forward(block_position)
                for handle in handles:
                    handle.remove()
        return hook

    handles.extend(block.register_forward_hook(record(position)) for position, block in enumerate(blocks))
    try:
        yield replay
    finally:
        for handle in handles:
            handle.remove()
        for position, forward in previous_forward.items():
            if forward is None:
                del blocks[position].forward
            else:
                blocks[position].forward = forward


def _select_rows(output: Any, rows: Tensor, batch: int) -> Any:
    if isinstance(output, Tensor):
        return output[rows.to(output.device)] if output.dim() and output.shape[0] == batch else output
    if type(output) in (tuple, list):
        return type(output)(_select_rows(item, rows, batch) for item in output)
    return output


def _clone_tensors(output: Any) -> Any:
    """Fresh tensors each pass, so that an in-place op downstream can never alter the recording."""
    if isinstance(output, Tensor):
        return output.detach().clone()
    if type(output) in (tuple, list):
        return type(output)(_clone_tensors(item) for item in output)
    return output
