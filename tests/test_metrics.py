"""Scores on hand-made logits (``grace_peft.evaluation.metrics``): no model, every argmax chosen by the test.

Spec §8: teacher-forced token accuracy is the fraction of target tokens whose argmax, given the gold prefix, is the
gold token. For a causal LM the token at position ``t`` is predicted by the logits at ``t - 1``; for a seq2seq
decoder the logits at ``t`` predict the label at ``t``.
"""

from __future__ import annotations

import pytest
import torch

from grace_peft.evaluation.metrics import gold_tokens, match_fraction, predicted_tokens
from grace_peft.query import IGNORE_INDEX

VOCAB = 12
X = IGNORE_INDEX


def logits_for(argmax_rows: list[list[int]], vocab: int = VOCAB) -> torch.Tensor:
    """Logits of shape (batch, length, vocab) whose argmax at each position is the given token (one-hot * 10)."""
    ids = torch.tensor(argmax_rows)
    return torch.nn.functional.one_hot(ids, vocab).float() * 10.0


def labels_for(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows)


def exactly(*values: float) -> torch.Tensor:
    """The float32 scores ``match_fraction`` must return, bit for bit."""
    return torch.tensor(values, dtype=torch.float32)


def as_lists(rows: list[torch.Tensor]) -> list[list[int]]:
    return [row.tolist() for row in rows]


# --------------------------------------------------------------------------------------------------- causal shift
def test_causal_shift_reads_the_prediction_one_position_before_the_label():
    # positions:            0  1  2  3  4
    # labels (gold target):  -  -  5  6  7   -> the logits at 1, 2, 3 predict 5, 6, 7
    labels = labels_for([[X, X, 5, 6, 7]])
    # argmax per position; right (shift 1) reading: pos1=5 ok, pos2=6 ok, pos3=9 wrong -> [5, 6, 9], 2/3
    # unshifted reading (pos 2,3,4): [6, 9, 5] -> 0/3 ; doubly shifted (pos 0,1,2): [7, 5, 6] -> 0/3
    logits = logits_for([[7, 5, 6, 9, 5]])

    predicted = as_lists(predicted_tokens(logits, labels, shift=True))
    assert predicted == [[5, 6, 9]]
    assert torch.equal(match_fraction(predicted, as_lists(gold_tokens(labels))), exactly(2 / 3))
    # the readings a scorer off by one position would make give other answers (sanity of the construction)
    unshifted = as_lists(predicted_tokens(logits, labels, shift=False))
    doubly_shifted = [logits.argmax(-1)[0, 0:3].tolist()]
    assert unshifted == [[6, 9, 5]] and doubly_shifted == [[7, 5, 6]]
    assert torch.equal(match_fraction(unshifted, [[5, 6, 7]]), exactly(0.0))
    assert torch.equal(match_fraction(doubly_shifted, [[5, 6, 7]]), exactly(0.0))


def test_causal_all_right_is_one_and_unshifted_is_zero():
    labels = labels_for([[X, X, 3, 4]])
    logits = logits_for([[0, 3, 4, 1]])  # shift reading: [3, 4]; unshifted: [4, 1]
    predicted = as_lists(predicted_tokens(logits, labels, shift=True))
    assert predicted == [[3, 4]]
    assert match_fraction(predicted, [[3, 4]]).tolist() == [1.0]
    assert match_fraction(as_lists(predicted_tokens(logits, labels, shift=False)), [[3, 4]]).tolist() == [0.0]


def test_causal_label_at_position_zero_cannot_be_scored_and_is_dropped():
    # a label at position 0 has no position before it: the causal reading has no prediction for it
    labels = labels_for([[2, X, 4]])
    logits = logits_for([[4, 4, 4]])
    assert as_lists(predicted_tokens(logits, labels, shift=True)) == [[4]]


# --------------------------------------------------------------------------------------------------- seq2seq
def test_seq2seq_reads_the_prediction_at_the_label_position():
    labels = labels_for([[5, 6, 7, X]])  # decoder labels, right padded
    # shift=False reading: pos0=5 ok, pos1=8 wrong, pos2=7 ok -> 2/3
    logits = logits_for([[5, 8, 7, 6]])
    predicted = as_lists(predicted_tokens(logits, labels, shift=False))
    assert predicted == [[5, 8, 7]]
    assert torch.equal(match_fraction(predicted, as_lists(gold_tokens(labels))), exactly(2 / 3))
    # shifted reading scores only labels 6, 7 from positions 0, 1: [5, 8] -> different answer
    assert as_lists(predicted_tokens(logits, labels, shift=True)) == [[5, 8]]


def test_seq2seq_all_right():
    labels = labels_for([[1, 2, 3]])
    logits = logits_for([[1, 2, 3]])
    predicted = as_lists(predicted_tokens(logits, labels, shift=False))
    assert predicted == [[1, 2, 3]]
    assert match_fraction(predicted, as_lists(gold_tokens(labels))).tolist() == [1.0]


# --------------------------------------------------------------------------------------------------- partial credit
@pytest.mark.parametrize(("argmax", "expected"), [
    ([0, 5, 6, 7, 0], 1.0),
    ([0, 5, 6, 0, 0], 2 / 3),
    ([0, 5, 0, 0, 0], 1 / 3),
    ([0, 0, 0, 0, 0], 0.0),
    ([0, 0, 6, 7, 0], 2 / 3),
])
def test_partial_credit_is_the_exact_fraction_of_target_tokens(argmax, expected):
    labels = labels_for([[X, X, 5, 6, 7]])
    logits = logits_for([argmax])
    score = match_fraction(predicted_tokens(logits, labels, shift=True), gold_tokens(labels))
    assert score.dtype == torch.float32
    assert torch.equal(score, exactly(expected))


def test_partial_credit_half_is_exact():
    labels = labels_for([[X, 1, 2]])
    logits = logits_for([[1, 9, 0]])  # predicts 1 (ok) then 9 (wrong)
    assert match_fraction(predicted_tokens(logits, labels, shift=True), gold_tokens(labels)).tolist() == [0.5]


# --------------------------------------------------------------------------------------------------- left padding
def test_left_padded_rows_are_scored_independently():
    pad = 0
    # row 0: no padding, prompt of 3, target [5, 6]; row 1: two pads, prompt of 1, target [7, 8]
    # row 2: one pad, prompt of 2, target of 2 [9, 10]
    labels = labels_for([
        [X, X, X, 5, 6],
        [X, X, X, 7, 8],
        [X, X, X, 9, 10],
    ])
    logits = logits_for([
        [pad, pad, 5, 6, 0],   # shift reading: pos2=5, pos3=6 -> [5, 6], 1.0
        [pad, pad, 7, 1, 8],   # pos2=7, pos3=1 -> [7, 1], 0.5
        [pad, 9, 1, 2, 10],    # pos2=1, pos3=2 -> [1, 2], 0.0 (unshifted would give [2, 10], 0.5)
    ])
    predicted = as_lists(predicted_tokens(logits, labels, shift=True))
    assert predicted == [[5, 6], [7, 1], [1, 2]]
    assert as_lists(gold_tokens(labels)) == [[5, 6], [7, 8], [9, 10]]
    assert match_fraction(predicted, gold_tokens(labels)).tolist() == [1.0, 0.5, 0.0]


def test_left_padded_rows_of_different_target_lengths():
    labels = labels_for([
        [X, X, X, X, 4],      # one-token target, padded prompt
        [X, X, 1, 2, 3],      # three-token target
    ])
    logits = logits_for([
        [0, 0, 0, 4, 0],
        [0, 1, 2, 0, 0],
    ])
    predicted = as_lists(predicted_tokens(logits, labels, shift=True))
    assert predicted == [[4], [1, 2, 0]]
    assert torch.equal(match_fraction(predicted, gold_tokens(labels)), exactly(1.0, 2 / 3))


def test_rows_do_not_leak_into_each_other():
    labels = labels_for([[X, 3, 3], [X, 3, 3]])
    logits = logits_for([[3, 3, 0], [0, 0, 0]])
    assert match_fraction(predicted_tokens(logits, labels, shift=True), gold_tokens(labels)).tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------------------------- gold tokens
def test_gold_tokens_keep_order_and_drop_unscored_positions():
    labels = labels_for([[X, 9, X, 2, 7], [4, 3, X, X, X]])
    assert as_lists(gold_tokens(labels)) == [[9, 2, 7], [4, 3]]


def test_gold_tokens_of_a_row_without_labels_is_empty():
    assert as_lists(gold_tokens(labels_for([[X, X]]))) == [[]]


# --------------------------------------------------------------------------------------------------- match_fraction
def test_match_fraction_position_wise():
    assert torch.equal(match_fraction([[1, 2, 3], [3, 2, 1]], [[1, 2, 3], [1, 2, 3]]), exactly(1.0, 1 / 3))


def test_match_fraction_is_position_wise_not_set_membership():
    # same tokens in another order match only where positions agree
    assert match_fraction([[2, 1]], [[1, 2]]).tolist() == [0.0]


def test_match_fraction_shorter_prediction_counts_missing_as_wrong():
    assert match_fraction([[1]], [[1, 2, 3, 4]]).tolist() == [0.25]
    assert match_fraction([[]], [[1, 2]]).tolist() == [0.0]


def test_match_fraction_longer_prediction_ignores_extra_tokens():
    assert match_fraction([[1, 2, 9, 9, 9]], [[1, 2]]).tolist() == [1.0]
    assert match_fraction([[1, 5, 2]], [[1, 2]]).tolist() == [0.5]


def test_match_fraction_accepts_tensors_and_lists():
    score = match_fraction([torch.tensor([1, 2]), [3, 4]], [[1, 0], torch.tensor([3, 4])])
    assert score.tolist() == [0.5, 1.0]


def test_match_fraction_empty_reference_raises():
    with pytest.raises(ValueError, match="empty reference"):
        match_fraction([[1]], [[]])
    with pytest.raises(ValueError):
        match_fraction([[1], [2]], [[1], torch.tensor([], dtype=torch.long)])


def test_match_fraction_row_count_mismatch_raises():
    with pytest.raises(ValueError, match="rows"):
        match_fraction([[1], [2]], [[1]])
    with pytest.raises(ValueError, match="rows"):
        match_fraction([[1]], [[1], [2]])


def test_match_fraction_of_no_rows_is_empty():
    assert match_fraction([], []).tolist() == []


# --------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shift", [True, False])
def test_logits_labels_length_mismatch_raises(shift):
    with pytest.raises(ValueError, match="do not match"):
        predicted_tokens(logits_for([[1, 2, 3]]), labels_for([[X, 1]]), shift=shift)


@pytest.mark.parametrize("shift", [True, False])
def test_logits_labels_batch_mismatch_raises(shift):
    with pytest.raises(ValueError, match="do not match"):
        predicted_tokens(logits_for([[1, 2], [1, 2]]), labels_for([[X, 1]]), shift=shift)
