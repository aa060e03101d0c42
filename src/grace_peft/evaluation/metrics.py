"""Scores on plain tensors (spec §8): no model, no tokenizer, so every off-by-one is testable on hand-made logits.

Conventions: ``labels`` hold the gold token id at every scored position and ``IGNORE_INDEX`` (-100) elsewhere. For a
causal LM (``shift=True``) the token at position ``t`` is predicted by the logits at ``t - 1``; for a seq2seq
decoder (``shift=False``) the logits at ``t`` predict the label at ``t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..inputs import causal_shift
from ..query import IGNORE_INDEX


def _aligned(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} in batch and length.")
    predictions = logits.argmax(-1).to(labels.device)
    return causal_shift(predictions, labels) if shift else (predictions, labels)


def predicted_tokens(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> list[torch.Tensor]:
    """Per row, the model's argmax token at every scored position (teacher forced: each given the gold prefix)."""
    predictions, labels = _aligned(logits, labels, shift=shift)
    return [predictions[row][labels[row] != IGNORE_INDEX] for row in range(len(labels))]


def gold_tokens(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the gold token ids at the scored positions, in order."""
    return [row[row != IGNORE_INDEX] for row in labels]


def match_fraction(predicted: Sequence[Sequence[int] | torch.Tensor],
                   reference: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
    """Per row, the fraction of ``reference`` positions where ``predicted`` has the same token.

    The one comparison behind every score: Rel/Gen (predictions vs. gold target tokens), Loc (predictions after
    editing vs. the unedited model's own predictions) and generation token match (generated vs. target tokens).
    A prediction shorter than its reference counts the missing positions as wrong; extra tokens are ignored."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predicted rows but {len(reference)} reference rows.")
    scores = []
    for row, (tokens, expected) in enumerate(zip(predicted, reference, strict=True)):
        tokens, expected = _as_list(tokens), _as_list(expected)
        if not expected:
            raise ValueError(f"Row {row} has nothing to compare with (an empty reference).")
        scores.append(sum(a == b for a, b in zip(tokens, expected, strict=False)) / len(expected))
    return torch.tensor(scores, dtype=torch.float32)


def _as_list(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    return tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
