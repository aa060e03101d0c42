"""Evaluation of edited models (spec §8): edit-file readers, scores on tensors, scorers and protocols."""

from .metrics import gold_tokens, match_fraction, predicted_tokens
from .protocol import Evaluator, LifelongResult, LocalityReference, Protocol, Scores, run_lifelong
from .records import (
    FORMATS,
    EditFileError,
    EditRecord,
    detect_format,
    read_counterfact,
    read_edits,
    read_jsonl,
    read_zsre,
    records_from_dicts,
)
from .scoring import Predictions, Scorer

__all__ = [
    "FORMATS",
    "EditFileError",
    "EditRecord",
    "Evaluator",
    "LifelongResult",
    "LocalityReference",
    "Predictions",
    "Protocol",
    "Scorer",
    "Scores",
    "detect_format",
    "gold_tokens",
    "match_fraction",
    "predicted_tokens",
    "read_counterfact",
    "read_edits",
    "read_jsonl",
    "read_zsre",
    "records_from_dicts",
    "run_lifelong",
]
