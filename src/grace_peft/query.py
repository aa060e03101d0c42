"""Which token is the query (spec §4) and when a forward pass asks at all (spec §5).

A forward pre-hook on the model (on the encoder of an encoder-decoder model) reads the attention mask, the labels
and the cache of every call and leaves a :class:`ForwardQuery` in a :class:`QueryContext` shared by the wrapped
layers. Positions are per row:

* an explicit ``grace_query_positions=`` keyword of the forward call wins;
* with token labels (causal LM teacher forcing): the position before the first labelled token of the row;
* otherwise the last non-padding token of the row (attention mask; left or right padding), or the last token.

A cached decoding step (``past_key_values`` already holding tokens) sees only generated tokens: it never queries.
Inside :meth:`QueryContext.generation`, the positions found on the first forward of the call are kept for all later
forwards of the same call, so generating without a cache queries the same prompt token as generating with one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

QUERY_POSITIONS_KWARG = "grace_query_positions"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ForwardQuery:
    """What the wrapped layers need to know about the current forward pass."""

    positions: torch.Tensor | None  # (batch,) query position per row; None on a cached decoding step
    decoding: bool  # a cached continuation: only generated tokens are seen


def last_token_positions(length: int, attention_mask: torch.Tensor | None, batch: int,
                         device: torch.device) -> torch.Tensor:
    """Last non-padding position of each row (``length - 1`` for rows without a mask)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    # index of the last 1 in each row, whichever side the padding is on
    return (length - 1 - attention_mask.flip(-1).ne(0).to(torch.int8).argmax(-1)).to(device=device, dtype=torch.long)


def label_query_positions(labels: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Position before the first labelled token of each row; ``fallback`` for rows without labels."""
    labelled = labels.ne(IGNORE_INDEX)
    first = labelled.to(torch.int8).argmax(-1)
    positions = (first - 1).clamp_min(0).to(fallback.device)
    return torch.where(labelled.any(-1).to(fallback.device), positions, fallback)


class QueryContext:
    """Query information of the current forward pass, shared by all GRACE layers of one model."""

    def __init__(self, labels_mark_targets: bool) -> None:
        # Token labels say where the target starts only for causal LMs; classifier labels are class ids and T5's
        # are decoder tokens, which the encoder never sees.
        self.labels_mark_targets = labels_mark_targets
        self.current: ForwardQuery | None = None
        self._in_generation = False
        self._generation_positions: torch.Tensor | None = None
        self._positional_names: dict[type, list[str]] = {}

    @contextmanager
    def generation(self) -> Iterator[None]:
        """Keep the prompt's query positions for every forward of one ``generate`` call, then forget them."""
        outer = (self._in_generation, self._generation_positions)
        self._in_generation, self._generation_positions = True, None
        try:
            yield
        finally:
            self._in_generation, self._generation_positions = outer
            self.current = None

    def pre_forward_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        """``register_forward_pre_hook(..., with_kwargs=True)`` target: records the query of this call."""
        override = kwargs.pop(QUERY_POSITIONS_KWARG, None)
        inputs = dict(zip(self._positional(module), args, strict=False))
        inputs.update(kwargs)
        reference = inputs.get("input_ids")
        if reference is None:
            reference = inputs.get("inputs_embeds")
        if reference is None:
            self.current = None
            return args, kwargs
        batch, length = reference.shape[0], reference.shape[1]
        decoding = _is_cached_continuation(inputs)
        if override is not None:
            positions = torch.as_tensor(override, dtype=torch.long, device=reference.device).reshape(-1)
            if positions.numel() != batch or (positions < 0).any() or (positions >= length).any():
                raise ValueError(f"{QUERY_POSITIONS_KWARG} must hold one position in [0, {length}) per row of the "
                                 f"batch ({batch} rows); got {positions.tolist()}.")
        elif decoding:
            positions = None
        elif self._generation_positions is not None and self._generation_positions.numel() == batch:
            positions = self._generation_positions
        else:
            positions = last_token_positions(length, inputs.get("attention_mask"), batch, reference.device)
            labels = inputs.get("labels")
            if self.labels_mark_targets and isinstance(labels, torch.Tensor) and labels.shape[:2] == (batch, length):
                positions = label_query_positions(labels, positions)
        if self._in_generation and self._generation_positions is None and positions is not None:
            self._generation_positions = positions
        self.current = ForwardQuery(positions=positions, decoding=decoding)
        return args, kwargs

    def _positional(self, module: torch.nn.Module) -> list[str]:
        cls = type(module)
        if cls not in self._positional_names:
            params = inspect.signature(module.forward).parameters.values()
            self._positional_names[cls] = [
                p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        return self._positional_names[cls]


def _is_cached_continuation(inputs: dict[str, Any]) -> bool:
    cache = inputs.get("past_key_values")
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length()) > 0
    cache_position = inputs.get("cache_position")
    return isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0 and int(cache_position[0]) > 0
