"""Tests of the GRACE codebook rules (``grace_peft.codebook``): hand-computed cases, then properties.

Hand-computed cases use 3-4-5 triangles and dyadic coordinates, so that every distance below is exact in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from grace_peft.codebook import (
    Codebook,
    CodebookOperation,
    CodebookShapeError,
    CodebookUpdate,
    ExpandRule,
)

ADD = CodebookOperation.ADD
EXPAND = CodebookOperation.EXPAND
SPLIT = CodebookOperation.SPLIT
OVERWRITE = CodebookOperation.OVERWRITE


# --------------------------------------------------------------------------------------------------- helpers
def make(eps: float = 1.0, rule: ExpandRule | str = ExpandRule.COVERAGE, key_dim: int = 2, value_dim: int = 3):
    return Codebook(key_dim, value_dim, eps_init=eps, expand_rule=rule)


def init_for(cb: Codebook, edit_id: int) -> torch.Tensor:
    """A value that says which edit it was made for: every component is ``100 + edit_id``."""
    return torch.full((cb.value_dim,), 100.0 + edit_id)


def edit(cb: Codebook, query, label, edit_id: int, init: torch.Tensor | None = None) -> CodebookUpdate:
    query = torch.as_tensor(query, dtype=torch.float32)
    init = init_for(cb, edit_id) if init is None else init
    return cb.update(query, torch.tensor(label, dtype=torch.int64), edit_id=edit_id, init_value=init)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def lookup1(cb: Codebook, query) -> int:
    return int(cb.lookup(torch.as_tensor(query, dtype=torch.float32).reshape(1, -1))[0])


def labels(cb: Codebook) -> list[list[int]]:
    return [cb.label(i).tolist() for i in range(len(cb))]


# =================================================================================================== construction
@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_constructor_rejects_bad_eps_init(eps):
    with pytest.raises(ValueError):
        Codebook(2, 3, eps_init=eps)


def test_new_codebook_is_empty_with_declared_dims_and_dtypes():
    cb = make(eps=0.5, rule="paper", key_dim=4, value_dim=6)
    assert len(cb) == 0
    assert cb.expand_rule is ExpandRule.PAPER
    assert cb.keys.shape == (0, 4) and cb.values.shape == (0, 6)
    assert cb.radii.shape == (0,) and cb.edit_ids.shape == (0,) and cb.label_lengths.shape == (0,)
    assert cb.keys.dtype == cb.values.dtype == cb.radii.dtype == torch.float32
    assert cb.label_tokens.dtype == cb.label_lengths.dtype == cb.edit_ids.dtype == torch.int64
    assert int(cb.next_edit_id) == 0
    assert [name for name, _ in cb.named_parameters()] == ["values"]


# =================================================================================================== ADD
def test_add_on_empty_codebook():
    cb = make(eps=0.5, value_dim=3)
    init = t(9.0, 8.0, 7.0)
    result = edit(cb, [1.0, 2.0], [7, 8], edit_id=3, init=init)
    assert result == CodebookUpdate(ADD, 0, None, None)
    assert len(cb) == 1
    assert torch.equal(cb.keys, t(1.0, 2.0).unsqueeze(0))
    assert cb.radii.tolist() == [0.5]  # radius == eps_init
    assert cb.label(0).tolist() == [7, 8]
    assert cb.label_lengths.tolist() == [2]
    assert cb.edit_ids.tolist() == [3]
    assert int(cb.next_edit_id) == 4  # first id not yet used
    assert torch.equal(cb.values.detach(), init.unsqueeze(0))
    assert isinstance(cb.values, nn.Parameter)


def test_add_when_query_ball_does_not_touch_nearest_ball():
    cb = make(eps=1.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    # d((0,0), (3,4)) = sqrt(9 + 16) = 5 > eps_init + E_0 = 1 + 1 = 2 -> ADD, even with the same label
    result = edit(cb, [3.0, 4.0], [1], edit_id=1)
    assert result == CodebookUpdate(ADD, 1, 0, 5.0)
    assert len(cb) == 2
    assert torch.equal(cb.keys, torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert cb.radii.tolist() == [1.0, 1.0]  # the old radius is untouched, the new one is eps_init
    assert cb.edit_ids.tolist() == [0, 1]
    assert labels(cb) == [[1], [1]]
    assert torch.equal(cb.values[1].detach(), init_for(cb, 1))


@pytest.mark.parametrize(
    ("label", "operation"), [([1], EXPAND), ([2], SPLIT)], ids=["same-label-expands", "other-label-splits"]
)
def test_distance_exactly_eps_plus_radius_is_not_an_add(label, operation):
    cb = make(eps=2.5)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    # d = sqrt(3^2 + 4^2) = 5 == eps_init + E_0 = 2.5 + 2.5: the balls touch, which is an overlap, not an ADD
    result = edit(cb, [3.0, 4.0], label, edit_id=1)
    assert result.operation is operation
    assert result.distance == 5.0 and result.nearest == 0


def test_distance_just_beyond_eps_plus_radius_is_an_add():
    cb = make(eps=2.5)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    x = torch.nextafter(torch.tensor(5.0), torch.tensor(6.0))  # the float32 right after 5
    result = edit(cb, torch.stack([x, torch.tensor(0.0)]), [1], edit_id=1)
    assert result.distance is not None and result.distance > 5.0  # d = 5 + 2^-21 > eps_init + E_0 = 5
    assert result.operation is ADD
    assert len(cb) == 2 and cb.radii.tolist() == [2.5, 2.5]


# =================================================================================================== EXPAND
@pytest.mark.parametrize(
    ("rule", "key", "radius"),
    [
        # eps_init = 3, E_0 = 3, d((0,0), (3,4)) = 5 <= 3 + 3 -> overlap with the same label
        (ExpandRule.COVERAGE, [0.0, 0.0], 5.0),  # max(3, 5) = 5
        (ExpandRule.PAPER, [0.0, 0.0], 6.0),  # 3 + 3 = 6
        (ExpandRule.MOVING_AVERAGE, [1.5, 2.0], 3.0),  # key -> ((0,0) + (3,4)) / 2, radius max(3, 5/2) = 3
    ],
)
def test_expand_rules_from_a_fresh_key(rule, key, radius):
    cb = make(eps=3.0, rule=rule)
    edit(cb, [0.0, 0.0], [4, 2], edit_id=0)
    result = edit(cb, [3.0, 4.0], [4, 2], edit_id=1)
    assert result == CodebookUpdate(EXPAND, 0, 0, 5.0)
    assert torch.equal(cb.keys, torch.tensor([key]))
    assert cb.radii.tolist() == [radius]


def shrunk_codebook(rule) -> Codebook:
    """Entry 0 at (0,0) with radius 1 (shrunk by a split), entry 1 at (2,0) with radius 1; eps_init = 4."""
    cb = make(eps=4.0, rule=rule)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    # d = 2 <= 4 + 4, other label -> SPLIT: E_0 = min(4, 2/2) = 1, new radius 2/2 = 1
    assert edit(cb, [2.0, 0.0], [2], edit_id=1).operation is SPLIT
    assert cb.radii.tolist() == [1.0, 1.0]
    return cb


@pytest.mark.parametrize(
    ("rule", "key", "radius"),
    [
        # query (-3,0): d to entry 0 = 3 (to entry 1: 5), 3 <= eps_init + E_0 = 4 + 1, same label -> EXPAND
        (ExpandRule.COVERAGE, [0.0, 0.0], 3.0),  # max(1, 3) = 3
        (ExpandRule.PAPER, [0.0, 0.0], 5.0),  # 1 + 4 = 5
        (ExpandRule.MOVING_AVERAGE, [-1.5, 0.0], 1.5),  # key -> ((0,0) + (-3,0)) / 2, radius max(1, 3/2) = 1.5
    ],
)
def test_expand_rules_from_a_shrunk_key(rule, key, radius):
    cb = shrunk_codebook(rule)
    result = edit(cb, [-3.0, 0.0], [1], edit_id=2)
    assert result == CodebookUpdate(EXPAND, 0, 0, 3.0)
    assert torch.equal(cb.keys[0], torch.tensor(key))
    assert cb.radii.tolist() == [radius, 1.0]
    assert torch.equal(cb.keys[1], t(2.0, 0.0))  # the other entry is untouched


def test_coverage_expand_never_shrinks_a_radius():
    cb = make(eps=3.0, rule="coverage")
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    # d((0,0), (1.5,2)) = sqrt(2.25 + 4) = 2.5 < E_0 = 3 -> radius stays max(3, 2.5) = 3
    assert edit(cb, [1.5, 2.0], [1], edit_id=1).operation is EXPAND
    assert cb.radii.tolist() == [3.0]


@pytest.mark.parametrize("rule", list(ExpandRule))
def test_expand_keeps_value_and_adds_no_entry(rule):
    cb = make(eps=3.0, rule=rule)
    edit(cb, [0.0, 0.0], [5, 6, 7], edit_id=0, init=t(1.0, 2.0, 3.0))
    cb.set_value(0, t(-1.0, 0.5, 4.0))  # a trained value
    result = edit(cb, [3.0, 4.0], [5, 6, 7], edit_id=9, init=t(10.0, 20.0, 30.0))
    assert result.operation is EXPAND and result.index == 0
    assert len(cb) == 1
    assert torch.equal(cb.values.detach(), t(-1.0, 0.5, 4.0).unsqueeze(0))  # init_value is ignored
    assert labels(cb) == [[5, 6, 7]] and cb.label_tokens.tolist() == [5, 6, 7]
    assert int(cb.next_edit_id) == 10


# =================================================================================================== SPLIT
def test_split_shrinks_old_radius_larger_than_half_distance():
    cb = make(eps=4.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0, init=t(1.0, 1.0, 1.0))
    # d((0,0), (3,4)) = 5 <= 4 + 4, other label -> SPLIT; E_0 = min(4, 5/2) = 2.5, new radius 5/2 = 2.5
    result = edit(cb, [3.0, 4.0], [2], edit_id=1, init=t(7.0, 8.0, 9.0))
    assert result == CodebookUpdate(SPLIT, 1, 0, 5.0)
    assert len(cb) == 2
    assert torch.equal(cb.keys, torch.tensor([[0.0, 0.0], [3.0, 4.0]]))  # new key == query, old key unmoved
    assert cb.radii.tolist() == [2.5, 2.5]
    assert torch.equal(cb.values.detach(), torch.tensor([[1.0, 1.0, 1.0], [7.0, 8.0, 9.0]]))
    assert labels(cb) == [[1], [2]]
    assert cb.edit_ids.tolist() == [0, 1]


def test_split_leaves_old_radius_smaller_than_half_distance():
    cb = shrunk_codebook(ExpandRule.COVERAGE)  # E_0 = 1 at (0,0), E_1 = 1 at (2,0)
    # query (0,-3): d to entry 0 = 3, to entry 1 = sqrt(4 + 9) ~ 3.61; 3 <= 4 + 1, other label -> SPLIT
    # E_0 = min(1, 3/2) = 1 (a split never grows a ball), new radius 3/2 = 1.5
    result = edit(cb, [0.0, -3.0], [3], edit_id=2)
    assert result == CodebookUpdate(SPLIT, 2, 0, 3.0)
    assert cb.radii.tolist() == [1.0, 1.0, 1.5]
    assert torch.equal(cb.keys[2], t(0.0, -3.0))
    assert torch.equal(cb.values[2].detach(), init_for(cb, 2))
    assert labels(cb) == [[1], [2], [3]]


def test_split_midpoint_hits_only_the_older_key():
    cb = make(eps=4.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    edit(cb, [3.0, 4.0], [2], edit_id=1)  # SPLIT, both radii 2.5
    # (1.5, 2) is at distance sqrt(2.25 + 4) = 2.5 from both keys: within both radii, a tie -> the older key
    index, distance = cb.nearest(t(1.5, 2.0))
    assert index.tolist() == [0] and distance.tolist() == [2.5]
    assert lookup1(cb, [1.5, 2.0]) == 0
    # and a step past the midpoint towards the new key belongs to the new key
    assert lookup1(cb, [1.5, 2.125]) == 1


def test_split_midpoint_one_dimensional_with_order_reversed():
    cb = make(eps=10.0, key_dim=1)
    edit(cb, [6.0], [1], edit_id=0)
    edit(cb, [2.0], [2], edit_id=1)  # d = 4 -> SPLIT, both radii 2; older key is the larger one
    assert cb.radii.tolist() == [2.0, 2.0]
    assert lookup1(cb, [4.0]) == 0  # distance 2 from both keys


def test_split_midpoint_hits_older_key_with_non_dyadic_coordinates():
    wrong, tried = [], 0
    for k in range(1, 60):
        a = torch.tensor(k * 0.37, dtype=torch.float32)
        upper, lower = a + 3.0, a - 3.0
        if float(upper) - float(a) != 3.0 or float(a) - float(lower) != 3.0:
            continue  # keep only the a for which both keys are exactly 3 away in float32
        tried += 1
        cb = make(eps=10.0, key_dim=1)
        edit(cb, upper.reshape(1), [1], edit_id=0)
        assert edit(cb, lower.reshape(1), [2], edit_id=1).operation is SPLIT  # d = 6, both radii 3
        # a is exactly 3 from both keys: a tie in distance, which the docstring gives to the older key
        if lookup1(cb, a.reshape(1)) != 0:
            wrong.append(float(a))
    assert tried >= 20
    assert wrong == []


# =================================================================================================== OVERWRITE
def test_overwrite_when_query_equals_a_key_with_another_label():
    cb = make(eps=1.0)
    edit(cb, [1.0, 2.0], [5], edit_id=0, init=t(1.0, 1.0, 1.0))
    edit(cb, [5.0, 5.0], [6, 6], edit_id=1)  # d = sqrt(16 + 9) = 5 > 2 -> ADD
    # query == key 0 exactly (d = 0), another label -> OVERWRITE entry 0
    result = edit(cb, [1.0, 2.0], [8, 9, 10], edit_id=4, init=t(3.0, 2.0, 1.0))
    assert result == CodebookUpdate(OVERWRITE, 0, 0, 0.0)
    assert len(cb) == 2
    assert labels(cb) == [[8, 9, 10], [6, 6]]
    assert cb.label_lengths.tolist() == [3, 2] and cb.label_tokens.tolist() == [8, 9, 10, 6, 6]
    assert cb.edit_ids.tolist() == [4, 1]
    assert torch.equal(cb.values[0].detach(), t(3.0, 2.0, 1.0))
    assert torch.equal(cb.keys[0], t(1.0, 2.0)) and cb.radii.tolist() == [1.0, 1.0]
    assert int(cb.next_edit_id) == 5
    assert lookup1(cb, [1.0, 2.0]) == 0


@pytest.mark.parametrize("rule", list(ExpandRule))
def test_same_query_same_label_is_an_expand_not_an_overwrite(rule):
    cb = make(eps=1.0, rule=rule)
    edit(cb, [1.0, 2.0], [5], edit_id=0, init=t(1.0, 1.0, 1.0))
    result = edit(cb, [1.0, 2.0], [5], edit_id=1, init=t(2.0, 2.0, 2.0))
    assert result == CodebookUpdate(EXPAND, 0, 0, 0.0)
    assert torch.equal(cb.values.detach(), t(1.0, 1.0, 1.0).unsqueeze(0))
    assert torch.equal(cb.keys, t(1.0, 2.0).unsqueeze(0))
    # d = 0: coverage max(1, 0) = 1; paper 1 + 1 = 2; moving average max(1, 0) = 1 with the key in place
    assert cb.radii.tolist() == [2.0 if rule is ExpandRule.PAPER else 1.0]


# =================================================================================================== labels
@pytest.mark.parametrize(
    ("first", "second"),
    [([1, 3], [2, 2]), ([1, 2], [2, 1]), ([1], [1, 1]), ([1, 1], [1]), ([4], [5])],
    ids=["same-mean", "permuted", "longer", "shorter", "single"],
)
def test_labels_compared_by_exact_token_ids(first, second):
    cb = make(eps=2.0)
    edit(cb, [0.0, 0.0], first, edit_id=0)
    # d((0,0), (0,2)) = 2 <= 2 + 2 -> overlap; another label -> SPLIT (an equal label would EXPAND)
    result = edit(cb, [0.0, 2.0], second, edit_id=1)
    assert result.operation is SPLIT
    assert labels(cb) == [first, second]


@pytest.mark.parametrize("label", [[1, 3], [7], [2, 2, 2, 9]])
def test_identical_label_expands(label):
    cb = make(eps=2.0)
    edit(cb, [0.0, 0.0], label, edit_id=0)
    assert edit(cb, [0.0, 2.0], list(label), edit_id=1).operation is EXPAND
    assert labels(cb) == [label]


def test_label_accepts_int_list_and_tensor_and_rejects_empty():
    cb = make(eps=2.0)
    cb.update(t(0.0, 0.0), 7, edit_id=0, init_value=init_for(cb, 0))
    assert cb.label(0).tolist() == [7]
    assert cb.update(t(0.0, 1.0), [7], edit_id=1, init_value=init_for(cb, 1)).operation is EXPAND
    assert cb.update(t(0.0, 1.0), torch.tensor([[7]]), edit_id=2, init_value=init_for(cb, 2)).operation is EXPAND
    with pytest.raises(ValueError):
        cb.update(t(9.0, 9.0), [], edit_id=3, init_value=init_for(cb, 3))
    assert len(cb) == 1


def test_ragged_labels_survive_adds_and_overwrites_of_different_lengths():
    cb = make(eps=0.5)
    # keys 4 apart on the x axis: d >= 4 > 0.5 + 0.5, so each is an ADD
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    edit(cb, [4.0, 0.0], [2, 3], edit_id=1)
    edit(cb, [8.0, 0.0], [4, 5, 6], edit_id=2)
    edit(cb, [12.0, 0.0], [7, 8], edit_id=3)
    assert labels(cb) == [[1], [2, 3], [4, 5, 6], [7, 8]]
    # overwrite in the middle with a longer label, at the front with a longer one, at the end with a shorter one
    assert edit(cb, [4.0, 0.0], [9, 10, 11, 12], edit_id=4).operation is OVERWRITE
    assert labels(cb) == [[1], [9, 10, 11, 12], [4, 5, 6], [7, 8]]
    assert edit(cb, [0.0, 0.0], [13, 14], edit_id=5).operation is OVERWRITE
    assert edit(cb, [12.0, 0.0], [15], edit_id=6).operation is OVERWRITE
    edit(cb, [16.0, 0.0], [16, 17, 18], edit_id=7)
    assert labels(cb) == [[13, 14], [9, 10, 11, 12], [4, 5, 6], [15], [16, 17, 18]]
    assert cb.label_lengths.tolist() == [2, 4, 3, 1, 3]
    assert cb.label_tokens.tolist() == [13, 14, 9, 10, 11, 12, 4, 5, 6, 15, 16, 17, 18]
    assert cb.edit_ids.tolist() == [5, 4, 2, 6, 7]
    assert int(cb.next_edit_id) == 8
    # the stored labels decide: the old label of entry 1 no longer expands it, its new one does
    assert edit(cb, [4.0, 0.25], [2, 3], edit_id=8).operation is SPLIT
    assert edit(cb, [0.0, 0.25], [13, 14], edit_id=9).operation is EXPAND


# =================================================================================================== lookup
def test_lookup_query_at_key_and_at_radius_hits_and_beyond_misses():
    cb = make(eps=5.0)
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    assert lookup1(cb, [0.0, 0.0]) == 0  # d = 0
    assert lookup1(cb, [3.0, 4.0]) == 0  # d = sqrt(9 + 16) = 5 == E_0: d <= E is a hit
    assert lookup1(cb, [-5.0, 0.0]) == 0  # d = 5
    beyond = torch.nextafter(torch.tensor(5.0), torch.tensor(6.0))  # 5 + 2^-21
    assert cb.nearest(torch.stack([beyond, torch.tensor(0.0)]))[1].item() > 5.0
    assert lookup1(cb, torch.stack([beyond, torch.tensor(0.0)])) == -1
    assert lookup1(cb, [3.0, 4.125]) == -1  # d = sqrt(9 + 17.015625) ~ 5.1


def test_lookup_respects_each_entrys_own_radius():
    cb = shrunk_codebook(ExpandRule.COVERAGE)  # (0,0) radius 1, (2,0) radius 1
    edit(cb, [10.0, 0.0], [3], edit_id=2)  # d = 8 > 4 + 1 -> ADD, radius 4
    queries = torch.tensor([[0.0, 1.0], [0.0, 1.25], [2.0, -1.0], [13.0, 0.0], [14.0, 0.0], [14.5, 0.0]])
    # distances: 1 to key 0; 1.25 to key 0; 1 to key 1; 3 to key 2; 4 to key 2; 4.5 to key 2
    assert cb.lookup(queries).tolist() == [0, -1, 1, 2, 2, -1]


def test_empty_codebook_defers_every_row():
    cb = make(eps=1.0, key_dim=3)
    queries = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0], [float("nan"), 0.0, 0.0]])
    assert cb.lookup(queries).tolist() == [-1, -1, -1]
    index, distance = cb.nearest(queries)
    assert index.tolist() == [-1, -1, -1] and index.dtype == torch.int64
    assert distance.dtype == torch.float32 and torch.isinf(distance).all() and (distance > 0).all()
    assert cb.lookup(t(0.0, 0.0, 0.0)).shape == (1,)  # one vector is a batch of one


def test_lookup_rejects_wrong_width():
    cb = make(eps=1.0, key_dim=3)
    with pytest.raises(ValueError):
        cb.lookup(torch.zeros(2, 4))
    with pytest.raises(ValueError):
        cb.update(torch.zeros(4), [1], edit_id=0, init_value=torch.zeros(3))


def scattered_codebook(seed: int = 0, key_dim: int = 4, entries: int = 12) -> Codebook:
    gen = torch.Generator().manual_seed(seed)
    cb = make(eps=0.75, key_dim=key_dim)
    for j in range(entries):
        edit(cb, torch.randn(key_dim, generator=gen) * 2, [j % 3, j], edit_id=j)
    return cb


def test_batch_lookup_equals_rowwise_lookup():
    cb = scattered_codebook()
    gen = torch.Generator().manual_seed(1)
    queries = torch.cat([cb.keys, cb.keys + 0.3 * torch.randn(cb.keys.shape, generator=gen),
                         torch.randn(20, 4, generator=gen) * 2])
    batched = cb.lookup(queries)
    rowwise = torch.cat([cb.lookup(row.unsqueeze(0)) for row in queries])
    assert torch.equal(batched, rowwise)
    index, distance = cb.nearest(queries)
    for row, i, d in zip(queries, index, distance, strict=True):
        i1, d1 = cb.nearest(row)
        assert int(i1) == int(i) and float(d1) == float(d)
    assert (batched >= 0).sum() >= len(cb)  # the keys themselves at least hit: the test is not all misses


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_queries_match_their_float32_upcast(dtype):
    cb = scattered_codebook(seed=2)
    gen = torch.Generator().manual_seed(3)
    queries = torch.cat([cb.keys + 0.2 * torch.randn(cb.keys.shape, generator=gen),
                         torch.randn(30, 4, generator=gen) * 2]).to(dtype)
    index, distance = cb.nearest(queries)
    index32, distance32 = cb.nearest(queries.float())
    assert distance.dtype == torch.float32
    assert torch.equal(index, index32) and torch.equal(distance, distance32)
    assert torch.equal(cb.lookup(queries), cb.lookup(queries.float()))
    assert (cb.lookup(queries) >= 0).any() and (cb.lookup(queries) == -1).any()


def test_low_precision_query_is_stored_as_float32():
    cb = make(eps=1.0)
    edit(cb, torch.tensor([0.1, 0.2], dtype=torch.bfloat16), [1], edit_id=0,
         init=torch.tensor([1.5, 2.5, 3.5], dtype=torch.float64))
    assert cb.keys.dtype == cb.values.dtype == cb.radii.dtype == torch.float32
    assert torch.equal(cb.keys[0], torch.tensor([0.1, 0.2], dtype=torch.bfloat16).float())
    assert cb.values[0].tolist() == [1.5, 2.5, 3.5]


def test_nan_query_never_hits_and_cannot_be_an_edit():
    cb = make(eps=1000.0)  # a ball that covers every finite query below
    edit(cb, [0.0, 0.0], [1], edit_id=0)
    queries = torch.tensor([[float("nan"), 0.0], [0.0, 0.0], [float("nan"), float("nan")], [1.0, 1.0],
                            [float("inf"), 0.0]])
    assert cb.lookup(queries).tolist() == [-1, 0, -1, 0, -1]
    before = {name: tensor.clone() for name, tensor in cb.state_dict().items()}
    for bad in ([float("nan"), 0.0], [0.0, float("inf")]):
        with pytest.raises(ValueError):
            edit(cb, bad, [2], edit_id=5)
    after = cb.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # a refused edit changes nothing


def test_query_equal_to_a_key_far_from_the_origin_has_distance_zero():
    cb = make(eps=1.0)
    edit(cb, [1000.0, 0.0], [1], edit_id=0)
    edit(cb, [1000.001, 0.0], [2], edit_id=1)  # d ~ 0.001 -> SPLIT, both radii ~ 0.0005
    index, distance = cb.nearest(cb.keys)
    assert distance.tolist() == [0.0, 0.0]  # "a query equal to a key has distance exactly 0"
    assert index.tolist() == [0, 1]
    assert cb.lookup(cb.keys).tolist() == [0, 1]


def test_edit_retrieves_its_own_entry_for_activation_sized_keys():
    gen = torch.Generator().manual_seed(0)
    failures = []
    for trial in range(10):
        cb = make(eps=1e-3, key_dim=64, value_dim=2)
        base = torch.randn(64, generator=gen) * 30
        queries = [base + 0.01 * torch.randn(64, generator=gen) for _ in range(5)]
        for j, query in enumerate(queries):
            result = edit(cb, query, [j], edit_id=j)
            if lookup1(cb, query) != result.index:
                failures.append((trial, j, "lookup"))
        if edit(cb, cb.keys[0].clone(), [99], edit_id=99).operation is not OVERWRITE:
            failures.append((trial, "overwrite"))
    assert failures == []


# =================================================================================================== state dict
def populated_codebook(key_dim: int = 3, value_dim: int = 5) -> Codebook:
    cb = make(eps=1.5, rule="moving_average", key_dim=key_dim, value_dim=value_dim)
    gen = torch.Generator().manual_seed(7)
    edit(cb, [0.0] * key_dim, [1], edit_id=0)
    edit(cb, [1.0] + [0.0] * (key_dim - 1), [2, 3, 4], edit_id=1)  # SPLIT
    edit(cb, [0.0, 0.5] + [0.0] * (key_dim - 2), [1], edit_id=2)  # EXPAND (moves key 0)
    edit(cb, [10.0] * key_dim, [5, 6], edit_id=7)  # ADD
    edit(cb, [10.0] * key_dim, [8], edit_id=3)  # OVERWRITE
    edit(cb, [-10.0] * key_dim, [9, 9, 9, 9], edit_id=4)  # ADD
    for i in range(len(cb)):
        cb.set_value(i, torch.randn(value_dim, generator=gen))  # values as if trained: non-trivial bits
    assert len(cb) == 4
    return cb


def test_state_dict_round_trip_into_empty_codebook_is_bit_exact():
    cb = populated_codebook()
    state = cb.state_dict()
    journal = {f"journal_{name}" for name in ("fields", "numbers", "target_tokens", "label_tokens_before", "text",
                                              "values", "keys")}
    assert set(state) == {"keys", "values", "radii", "label_tokens", "label_lengths", "edit_ids", "next_edit_id",
                          "gate_tokens", "gate_lengths", "gate_owners", *journal}
    fresh = make(eps=1.5, rule="moving_average", key_dim=3, value_dim=5)
    fresh.load_state_dict(state)
    loaded = fresh.state_dict()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    assert isinstance(fresh.values, nn.Parameter) and fresh.values.requires_grad
    assert [name for name, _ in fresh.named_parameters()] == ["values"]
    assert fresh.keys.dtype == fresh.values.dtype == fresh.radii.dtype == torch.float32
    assert fresh.label_tokens.dtype == fresh.label_lengths.dtype == fresh.edit_ids.dtype == torch.int64
    assert fresh.next_edit_id.dtype == torch.int64 and int(fresh.next_edit_id) == 8
    assert labels(fresh) == labels(cb) == [[1], [2, 3, 4], [8], [9, 9, 9, 9]]
    assert len(fresh) == 4


def test_loaded_codebook_behaves_like_the_original():
    cb = populated_codebook()
    fresh = make(eps=1.5, rule="moving_average", key_dim=3, value_dim=5)
    fresh.load_state_dict(cb.state_dict())
    gen = torch.Generator().manual_seed(11)
    queries = torch.cat([cb.keys, torch.randn(40, 3, generator=gen) * 4])
    assert torch.equal(fresh.lookup(queries), cb.lookup(queries))
    # and keeps working as a codebook: the same next edit does the same thing to both
    for book in (cb, fresh):
        # nearest key (1,0,0) at d = 0.125 <= 1.5 + 0.5, same label [2, 3, 4]
        assert edit(book, [0.875, 0.0, 0.0], [2, 3, 4], edit_id=20).operation is EXPAND
    same_entries = [torch.equal(a, b) for name, (a, b) in
                    zip(cb.state_dict(), zip(cb.state_dict().values(), fresh.state_dict().values(), strict=True),
                        strict=True) if not name.startswith("journal_")]  # journals differ in the edits' times
    assert all(same_entries)
    assert [record.operation for record in fresh.journal.records()] == [r.operation for r in cb.journal.records()]


def test_load_shrinks_a_larger_codebook_to_the_saved_size():
    small = make(eps=1.0, key_dim=2, value_dim=3)
    edit(small, [0.0, 0.0], [1, 2], edit_id=0)
    big = make(eps=1.0, key_dim=2, value_dim=3)
    for j in range(3):
        edit(big, [5.0 * j, 0.0], [j, j, j], edit_id=j)
    big.load_state_dict(small.state_dict())
    assert len(big) == 1
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), big.state_dict().values(), strict=True))
    assert labels(big) == [[1, 2]]
    assert isinstance(big.values, nn.Parameter)


def test_load_into_a_codebook_built_with_size():
    cb = populated_codebook()
    sized = Codebook(3, 5, eps_init=1.5, expand_rule="moving_average", size=4)
    sized.load_state_dict(cb.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(cb.state_dict().values(), sized.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    ("target_dims", "saved_shape", "needed"),
    [((4, 5), "(4, 3)", "(n, 4)"), ((3, 6), "(4, 5)", "(n, 6)"), ((2, 7), "(4, 3)", "(n, 2)")],
    ids=["key-width", "value-width", "both"],
)
def test_load_of_another_width_raises_codebook_shape_error(target_dims, saved_shape, needed):
    state = populated_codebook(key_dim=3, value_dim=5).state_dict()
    target = make(eps=1.5, key_dim=target_dims[0], value_dim=target_dims[1])
    with pytest.raises(CodebookShapeError) as info:
        target.load_state_dict(state)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert saved_shape in message and needed in message


@pytest.mark.parametrize(
    "target_dims",
    [
        (4, 5),
        (3, 6),
        (2, 7),
    ],
    ids=["key-width", "value-width", "both"],
)
def test_refused_load_leaves_the_codebook_unchanged(target_dims):
    state = populated_codebook(key_dim=3, value_dim=5).state_dict()
    target = make(eps=1.5, key_dim=target_dims[0], value_dim=target_dims[1])
    edit(target, [0.0] * target_dims[0], [1], edit_id=0)
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    with pytest.raises(CodebookShapeError):
        target.load_state_dict(state)
    after = target.state_dict()
    assert {name: tuple(tensor.shape) for name, tensor in after.items()} == {
        name: tuple(tensor.shape) for name, tensor in before.items()}
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_load_of_empty_codebook_of_another_width_raises():
    with pytest.raises(CodebookShapeError):
        make(key_dim=4).load_state_dict(make(key_dim=3).state_dict())


# =================================================================================================== properties
LABELS = [(1,), (2,), (1, 2), (2, 1), (3, 3, 3)]
COORD = st.integers(-8, 8).map(lambda v: v * 0.5)


@st.composite
def scenarios(draw):
    dim = draw(st.integers(2, 4))
    rule = draw(st.sampled_from(list(ExpandRule)))
    eps = draw(st.sampled_from([0.5, 1.0, 1.5, 3.0]))
    count = draw(st.integers(1, 10))
    edits = []
    for k in range(count):
        mode = draw(st.sampled_from(["new", "same", "near", "near"])) if k else "new"
        label = draw(st.sampled_from(LABELS))
        if mode == "new":
            point = tuple(draw(st.lists(COORD, min_size=dim, max_size=dim)))
        else:  # re-edit an earlier query exactly, or a point a few half-steps from it, often with its label
            earlier, earlier_label, _ = edits[draw(st.integers(0, k - 1))]
            point = earlier
            if mode == "near":
                offset = draw(st.lists(st.integers(-3, 3), min_size=dim, max_size=dim))
                point = tuple(x + 0.5 * o for x, o in zip(earlier, offset, strict=True))
            label = earlier_label if draw(st.booleans()) else label
        edits.append((point, label, draw(st.integers(0, 60))))
    return dim, rule, eps, edits


def reference_nearest(keys: torch.Tensor, query: torch.Tensor) -> tuple[int, float]:
    """Nearest key in float64, ties to the lowest index (the documented rule)."""
    squared = ((keys.double() - query.double()) ** 2).sum(-1).tolist()
    index = min(range(len(squared)), key=lambda j: (squared[j], j))
    return index, math.sqrt(squared[index])


def reference_lookup(cb: Codebook, query: torch.Tensor) -> int:
    """Documented hit rule: nearest key (ties to the lowest index), hit iff its float32 distance <= its radius."""
    if len(cb) == 0:
        return -1
    index, _ = reference_nearest(cb.keys, query)
    distance = (query.float() - cb.keys[index]).norm()  # "all distances are computed in float32"
    return index if float(distance) <= float(cb.radii[index]) else -1


def check_invariants(cb: Codebook, passed_ids: list[int]) -> None:
    n = len(cb)
    # (e) consistent lengths, radii finite and positive
    assert cb.keys.shape == (n, cb.key_dim) and cb.values.shape == (n, cb.value_dim)
    assert cb.radii.shape == cb.label_lengths.shape == cb.edit_ids.shape == (n,)
    assert cb.label_tokens.shape == (int(cb.label_lengths.sum()),)
    assert (cb.label_lengths >= 1).all()
    assert torch.isfinite(cb.radii).all() and (cb.radii > 0).all()
    assert torch.isfinite(cb.keys).all()
    # (f) edit ids come from the edits; next_edit_id is one past the largest id passed
    assert set(cb.edit_ids.tolist()) <= set(passed_ids)
    assert int(cb.next_edit_id) == max(passed_ids) + 1
    # (b) a query exactly at a (current) key hits an entry whose key is that point
    hits = cb.lookup(cb.keys)
    assert (hits >= 0).all()
    assert torch.equal(cb.keys[hits], cb.keys)
    # (c) a point farther than max radius + 1 from every key never hits
    reach = float(cb.keys.abs().max()) + float(cb.radii.max()) + 1.0
    far = torch.stack([torch.full((cb.key_dim,), reach * 1.01), torch.full((cb.key_dim,), -reach * 1.01)])
    far[1, 0] = reach * 1.01
    assert (torch.cdist(far.double(), cb.keys.double()) > float(cb.radii.max()) + 1.0).all()
    assert cb.lookup(far).tolist() == [-1, -1]
    # lookup agrees with a float64 reference on the keys and the midpoints of every pair of keys
    probes = [cb.keys[j] for j in range(n)]
    probes += [(cb.keys[a] + cb.keys[b]) / 2 for a in range(n) for b in range(a + 1, n)]
    probes = torch.stack(probes)
    assert cb.lookup(probes).tolist() == [reference_lookup(cb, p) for p in probes]


def apply_and_check(cb: Codebook, query: torch.Tensor, label: tuple[int, ...], edit_id: int) -> CodebookUpdate:
    before = {name: tensor.clone() for name, tensor in cb.state_dict().items()}
    before_labels = labels(cb)
    n = len(cb)
    init = torch.arange(cb.value_dim, dtype=torch.float32) + 1000.0 * (edit_id + 1)
    result = cb.update(query, torch.tensor(label), edit_id=edit_id, init_value=init)
    eps = cb.eps_init

    if n == 0:
        assert result == CodebookUpdate(ADD, 0, None, None)
    else:
        i, d = reference_nearest(before["keys"], query)
        assert result.nearest == i
        assert result.distance == pytest.approx(d, rel=1e-6, abs=0.0)
        E_i, d = float(before["radii"][i]), result.distance  # the rules use the float32 distance
        if d > eps + E_i:
            expected = ADD
        elif list(label) == before_labels[i]:
            expected = EXPAND
        else:
            expected = OVERWRITE if d == 0 else SPLIT
        assert result.operation is expected

    untouched = range(n)
    if result.operation in (ADD, SPLIT):
        assert len(cb) == n + 1 and result.index == n
        assert torch.equal(cb.keys[n], query)
        assert torch.equal(cb.values[n].detach(), init)
        assert cb.label(n).tolist() == list(label) and int(cb.edit_ids[n]) == edit_id
        if result.operation is ADD:
            assert float(cb.radii[n]) == eps
        else:
            i, d = result.nearest, result.distance
            assert 0 < d <= eps + float(before["radii"][i])
            assert float(cb.radii[n]) == pytest.approx(d / 2, rel=1e-6)
            assert float(cb.radii[i]) == min(float(before["radii"][i]), float(cb.radii[n]))
            # (a) the old ball and the new ball do not overlap
            gap = float((cb.keys[i].double() - cb.keys[n].double()).norm())
            assert gap >= float(cb.radii[i]) + float(cb.radii[n]) - 1e-5
            untouched = [j for j in range(n) if j != i]
    else:
        i = result.index
        assert len(cb) == n and i == result.nearest
        untouched = [j for j in range(n) if j != i]
        if result.operation is EXPAND:
            assert cb.label(i).tolist() == list(label)
            assert torch.equal(cb.values.detach(), before["values"])
            old_key, old_radius, d = before["keys"][i], float(before["radii"][i]), result.distance
            if cb.expand_rule is ExpandRule.COVERAGE:
                assert torch.equal(cb.keys[i], old_key) and float(cb.radii[i]) == max(old_radius, d)
            elif cb.expand_rule is ExpandRule.PAPER:
                assert torch.equal(cb.keys[i], old_key)
                assert float(cb.radii[i]) == pytest.approx(old_radius + eps, rel=1e-6)
            else:
                assert torch.equal(cb.keys[i], (old_key + query) / 2)
                assert float(cb.radii[i]) == pytest.approx(max(old_radius, d / 2), rel=1e-6)
        else:  # OVERWRITE
            assert result.distance == 0.0
            assert torch.equal(cb.keys[i], before["keys"][i])
            assert cb.label(i).tolist() == list(label) and int(cb.edit_ids[i]) == edit_id
            assert torch.equal(cb.values[i].detach(), init)
    for j in untouched:  # an edit changes at most the entry it names and the nearest one
        assert torch.equal(cb.keys[j], before["keys"][j]) and torch.equal(cb.values[j], before["values"][j])
        assert float(cb.radii[j]) == float(before["radii"][j]) and cb.label(j).tolist() == before_labels[j]
        assert int(cb.edit_ids[j]) == int(before["edit_ids"][j])
    # (d) right after the update, the edit's own query retrieves the entry the update names
    assert lookup1(cb, query) == result.index
    return result


@settings(max_examples=50, deadline=None)
@given(scenarios())
def test_property_rules_and_invariants_hold_after_every_edit(scenario):
    dim, rule, eps, edits = scenario
    cb = make(eps=eps, rule=rule, key_dim=dim, value_dim=2)
    passed = []
    for point, label, edit_id in edits:
        passed.append(edit_id)
        apply_and_check(cb, torch.tensor(point, dtype=torch.float32), label, edit_id)
        check_invariants(cb, passed)


@settings(max_examples=50, deadline=None)
@given(scenarios(), st.data())
def test_property_batch_lookup_matches_rows_and_reference(scenario, data):
    dim, rule, eps, edits = scenario
    cb = make(eps=eps, rule=rule, key_dim=dim, value_dim=2)
    for point, label, edit_id in edits:
        cb.update(torch.tensor(point), torch.tensor(label), edit_id=edit_id, init_value=torch.zeros(2))
    points = data.draw(st.lists(st.lists(COORD, min_size=dim, max_size=dim), min_size=1, max_size=12))
    queries = torch.tensor(points, dtype=torch.float32)
    batched = cb.lookup(queries)
    assert batched.tolist() == [lookup1(cb, q) for q in queries]
    assert batched.tolist() == [reference_lookup(cb, q) for q in queries]
    for dtype in (torch.float16, torch.bfloat16):  # these half-step coordinates are exact in both
        assert torch.equal(cb.lookup(queries.to(dtype)), batched)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 4), st.lists(COORD, min_size=4, max_size=4), st.lists(COORD, min_size=4, max_size=4),
       st.sampled_from([1.0, 4.0, 16.0]))
def test_property_split_midpoint_goes_to_the_older_key(dim, first, second, eps):
    first, second = torch.tensor(first[:dim]), torch.tensor(second[:dim])
    cb = make(eps=eps, key_dim=dim)
    edit(cb, first, [1], edit_id=0)
    result = edit(cb, second, [2], edit_id=1)
    assume(result.operation is SPLIT)
    midpoint = (first + second) / 2
    assert float(cb.radii[0]) == float(cb.radii[1]) == pytest.approx(result.distance / 2)
    # the midpoint is d/2 from both keys; with d/2 in both radii it is a tie, won by the older key
    assert lookup1(cb, midpoint) == 0


# =================================================================================================== large codebooks
def filled(keys: torch.Tensor) -> Codebook:
    """A codebook holding ``keys`` (radius 1, one label each), as if each had been added by an edit."""
    cb = make(eps=1.0, key_dim=keys.shape[1], value_dim=2)
    for j, key in enumerate(keys):
        cb._append(key, torch.zeros(2), 1.0, torch.tensor([j]), j)
    cb.next_edit_id.fill_(len(keys))
    return cb


@settings(max_examples=25, deadline=None)
@given(st.integers(65, 400), st.sampled_from([4, 32, 96]), st.sampled_from([1e-3, 1.0, 1e3, 1e5]),
       st.sampled_from([0.0, 1e-6, 1e-3]), st.integers(0, 2**31 - 1))
def test_property_screened_search_equals_the_exact_distance_to_every_key(n, dim, scale, spread, seed):
    # keys in near-duplicate pairs around points far from the origin: where |q|^2 - 2qk + |k|^2 cancels
    gen = torch.Generator().manual_seed(seed)
    centers = (torch.randn(n // 2 + 1, dim, generator=gen) + 3) * scale
    keys = torch.cat([centers, centers + spread * scale * torch.randn_like(centers)])[:n]
    cb = filled(keys)
    queries = torch.cat([keys[:7], (keys[:7] + keys[-7:]) / 2, keys[:7] + 1e-4 * scale * torch.randn(7, dim,
                        generator=gen), (torch.randn(7, dim, generator=gen) + 3) * scale])
    index, distance = cb.nearest(queries)
    exact = torch.cdist(queries, cb.keys, compute_mode="donot_use_mm_for_euclid_dist")
    expected = exact.min(-1).values
    assert torch.equal(distance, expected)
    # ties go to the lower index, as in the exact search over every key
    assert index.tolist() == [int((row == best).nonzero()[0]) for row, best in zip(exact, expected, strict=True)]
    assert torch.equal(cb.lookup(queries), torch.where(distance <= cb.radii[index], index, -1))
    assert index[:7].tolist() == [int((cb.keys == key).all(-1).nonzero()[0]) for key in keys[:7]]


def test_large_codebook_search_keeps_nan_queries_missing():
    cb = filled(torch.randn(100, 8))
    queries = torch.stack([cb.keys[3], torch.full((8,), float("nan"))])
    assert cb.lookup(queries).tolist() == [3, -1]


def test_large_codebook_search_follows_keys_changed_in_place_and_by_loading():
    gen = torch.Generator().manual_seed(3)
    cb = filled(torch.randn(100, 8, generator=gen))
    cb.expand_rule = ExpandRule.MOVING_AVERAGE
    queries = torch.randn(5, 8, generator=gen)

    def exact(book):
        return torch.cdist(queries, book.keys, compute_mode="donot_use_mm_for_euclid_dist").min(-1)

    nearest = int(cb.nearest(queries)[0][0])  # the key norms are now kept
    label = cb.label(nearest).clone()
    moved = cb.keys[nearest] + 0.6  # a same-label edit within reach (1.7 < 2): the key moves halfway, in place
    result = cb.update(moved, label, edit_id=500, init_value=torch.zeros(2))
    assert result.operation is CodebookOperation.EXPAND and result.index == nearest
    queries = torch.cat([queries, cb.keys[nearest][None]])
    assert cb.nearest(queries)[0][-1] == nearest and cb.nearest(queries)[1][-1] == 0
    assert torch.equal(cb.nearest(queries)[0], exact(cb).indices)
    assert torch.equal(cb.nearest(queries)[1], exact(cb).values)
    other = filled(torch.randn(100, 8, generator=gen))
    cb.load_state_dict(other.state_dict())
    assert torch.equal(cb.nearest(queries)[0], exact(other).indices)
    assert torch.equal(cb.nearest(queries)[1], exact(other).values)
