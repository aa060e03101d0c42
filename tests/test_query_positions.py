"""Which token queries the codebook, row by row (``grace_peft.query``), and what that means for whole models.

Unit tests of the position rules and of :class:`QueryContext.pre_forward_hook` come first; then end-to-end checks on
the tiny models of ``conftest``: a padded batch gives every row what the row gives alone, teacher forcing queries the
last prompt token, and greedy generation is the same with and without a KV cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import EDITS, PAD, TINY_MODELS, UNEDITED, VOCAB, edited, grace_layer, make_tokenizer
from peft import get_peft_model
from torch import nn
from transformers import LogitsProcessorList

from grace_peft import GraceConfig
from grace_peft.query import (
    IGNORE_INDEX,
    QUERY_POSITIONS_KWARG,
    CallState,
    label_query_positions,
    last_token_positions,
)

TEMPLATES = {"gpt2": None, "llama": "bos", "t5": None}
ATOL = 1e-5


# --------------------------------------------------------------------------------------------------- helpers
@contextmanager
def recorded_positions(model: nn.Module) -> Iterator[list]:
    """Records, for every forward of the GRACE layer, the query positions it is given (None on a decoding step)."""
    layer = grace_layer(model)
    seen: list = []

    def hook(module, args):
        current = module.call_state.current
        if current is None:
            seen.append("no query")
        else:
            seen.append(None if current.positions is None else current.positions.tolist())

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def encode(tokenizer, prompts) -> dict[str, torch.Tensor]:
    """Batch of prompts, padded on the tokenizer's side, with explicit position ids (GPT-2's absolute positions
    must skip left padding to match an unpadded call)."""
    batch = dict(tokenizer(list(prompts), return_tensors="pt", padding=True))
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return batch


def token(word: str) -> int:
    return VOCAB[word]


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


# =================================================================================================== position rules
def test_last_token_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    positions = last_token_positions(5, mask, 3, torch.device("cpu"))
    assert positions.dtype == torch.long
    assert positions.tolist() == [2, 4, 0]


def test_last_token_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_positions(5, mask, 3, torch.device("cpu")).tolist() == [4, 4, 4]


def test_last_token_bool_mask():
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    assert last_token_positions(4, mask, 2, torch.device("cpu")).tolist() == [1, 2]


def test_last_token_without_mask_is_last_position():
    positions = last_token_positions(7, None, 3, torch.device("cpu"))
    assert positions.dtype == torch.long
    assert positions.tolist() == [6, 6, 6]


def test_last_token_ignores_a_mask_that_is_not_two_dimensional():
    mask4d = torch.zeros(2, 1, 6, 6)  # an additive attention bias, not a padding mask
    assert last_token_positions(6, mask4d, 2, torch.device("cpu")).tolist() == [5, 5]


@pytest.mark.parametrize("first", [1, 2, 4, 5])
def test_label_position_is_before_first_label(first):
    labels = torch.full((1, 6), IGNORE_INDEX)
    labels[0, first:] = 9
    assert label_query_positions(labels, torch.tensor([5])).tolist() == [first - 1]


def test_label_positions_per_row_and_fallback_for_unlabelled_rows():
    x = IGNORE_INDEX
    labels = torch.tensor([
        [x, x, x, 7, 8, x],  # right-padded target: query at 2
        [x, 5, 6, x, x, x],  # query at 0
        [x, x, x, x, x, x],  # no labels: fallback
        [x, x, x, x, x, 3],  # left-padded prompt, target last: query at 4
    ])
    fallback = torch.tensor([5, 2, 3, 1])
    positions = label_query_positions(labels, fallback)
    assert positions.dtype == torch.long
    assert positions.tolist() == [2, 0, 3, 4]


# =================================================================================================== pre_forward_hook
class Recorder(nn.Module):
    """Stands for a model: only its forward signature matters to the hook."""

    def forward(self, input_ids, attention_mask=None, labels=None, past_key_values=None):
        return input_ids


IDS = torch.arange(12).reshape(2, 6)
RIGHT_MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


def test_hook_override_is_popped_and_wins_over_mask_and_labels():
    context = CallState(labels_mark_targets=True)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[:, 3] = 1
    kwargs = {"input_ids": IDS, "attention_mask": RIGHT_MASK, "labels": labels, QUERY_POSITIONS_KWARG: [1, 4]}
    args, new_kwargs = context.pre_forward_hook(Recorder(), (), kwargs)
    assert QUERY_POSITIONS_KWARG not in new_kwargs
    assert set(new_kwargs) == {"input_ids", "attention_mask", "labels"}
    assert context.current.positions.tolist() == [1, 4]
    assert context.current.decoding is False


def test_hook_override_as_tensor():
    context = CallState(labels_mark_targets=False)
    _, kwargs = context.pre_forward_hook(Recorder(), (IDS,), {QUERY_POSITIONS_KWARG: torch.tensor([[0], [5]])})
    assert kwargs == {}
    assert context.current.positions.tolist() == [0, 5]


@pytest.mark.parametrize("override", [[0, 6], [-1, 2], [3], [1, 2, 3]],
                         ids=["past-end", "negative", "too-few", "too-many"])
def test_hook_rejects_bad_override(override):
    context = CallState(labels_mark_targets=False)
    with pytest.raises(ValueError, match=QUERY_POSITIONS_KWARG):
        context.pre_forward_hook(Recorder(), (), {"input_ids": IDS, QUERY_POSITIONS_KWARG: override})


def test_hook_maps_positional_arguments_by_signature():
    context = CallState(labels_mark_targets=True)
    context.pre_forward_hook(Recorder(), (IDS, RIGHT_MASK), {})
    assert context.current.positions.tolist() == [3, 5]  # from the positional attention mask
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 2:4] = 1
    context.pre_forward_hook(Recorder(), (IDS, RIGHT_MASK, labels), {})
    assert context.current.positions.tolist() == [1, 5]  # row 0 from its labels, row 1 from the mask


def test_hook_labels_ignored_when_they_do_not_mark_targets():
    context = CallState(labels_mark_targets=False)  # e.g. a classifier: labels are class ids
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[:, 1] = 1
    context.pre_forward_hook(Recorder(), (), {"input_ids": IDS, "attention_mask": RIGHT_MASK, "labels": labels})
    assert context.current.positions.tolist() == [3, 5]


def test_override_through_the_peft_model_moves_the_edit():
    tm, model = edited("gpt2")
    inputs = {"input_ids": torch.tensor([tm.tokenizer("the capital of australia is canberra")["input_ids"]])}
    with model.disable_adapter():
        base = logits_of(model, inputs)
    with recorded_positions(model) as seen:
        plain = logits_of(model, inputs)
        moved = logits_of(model, {**inputs, QUERY_POSITIONS_KWARG: [4]})
    assert seen == [[5], [4]]
    # without the override the last token ("canberra") queries: no hit, the model is the base model
    torch.testing.assert_close(plain, base, atol=ATOL, rtol=0)
    # with it, "is" queries and predicts the edit's target
    assert base[0, 4].argmax() != token("canberra")
    assert moved[0, 4].argmax() == token("canberra")
    with pytest.raises(ValueError, match=QUERY_POSITIONS_KWARG):
        logits_of(model, {**inputs, QUERY_POSITIONS_KWARG: [6]})


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_positional_arguments_of_real_models_are_mapped(kind):
    tm, model = edited(kind)
    hooked = model.get_base_model()
    batch = encode(tm.tokenizer, ["who leads apple", "satya lives in a city"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width, last = ids.shape[1], (mask.sum(-1) - 1).tolist()
    assert last[0] < last[1] == width - 1, "setup: row 0 must be right-padded"
    mask_slot = list(inspect.signature(hooked.forward).parameters).index("attention_mask")  # differs by release
    assert mask_slot > 0
    positional = (ids, *[None] * (mask_slot - 1), mask)  # the mask given positionally, in its slot
    with recorded_positions(model) as seen, torch.no_grad():
        hooked(ids)  # no mask: the last position of every row
        hooked(*positional)
        model(*positional)  # a PeftModel without task_type passes positional arguments through
    assert seen == [[width - 1] * 2, last, last]


# =================================================================================================== batches
BATCH_CASES = [("gpt2", "replace_last"), ("llama", "replace_last"), ("gpt2", "replace_all"),
               ("gpt2", "replace_prompt")]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("kind", "replacement"), BATCH_CASES, ids=["-".join(case) for case in BATCH_CASES])
def test_batch_rows_equal_single_calls(kind, replacement, padding_side):
    tm, model = edited(kind, replacement)
    tokenizer = make_tokenizer(TEMPLATES[kind], padding_side)
    prompts = [EDITS[0][0], UNEDITED[0], EDITS[1][0], UNEDITED[2], EDITS[2][0], UNEDITED[1]]
    batch = encode(tokenizer, prompts)
    mask = batch["attention_mask"].bool()
    assert len(set(mask.sum(-1).tolist())) > 1, "setup: rows must differ in length"
    with recorded_positions(model) as seen:
        batched = logits_of(model, batch)
    last = (mask.sum(-1) - 1) if padding_side == "right" else torch.full((len(prompts),), mask.shape[1] - 1)
    assert seen == [last.tolist()]
    with model.disable_adapter():
        base = logits_of(model, batch)

    targets = dict(EDITS)
    for row, prompt in enumerate(prompts):
        single = logits_of(model, encode(tokenizer, [prompt]))[0]
        row_logits = batched[row][mask[row]]
        assert row_logits.shape == single.shape
        torch.testing.assert_close(row_logits, single, atol=ATOL, rtol=0)
        assert torch.equal(row_logits.argmax(-1), single.argmax(-1))
        if prompt in targets:
            target = token(targets[prompt])
            assert base[row][mask[row]][-1].argmax() != target, "setup: the base model already predicts it"
            assert row_logits[-1].argmax() == target
        else:
            torch.testing.assert_close(row_logits, base[row][mask[row]], atol=ATOL, rtol=0)


# =================================================================================================== teacher forcing
def teacher_forced(tokenizer, pairs, padding_side: str) -> dict[str, torch.Tensor]:
    """``prompt target`` rows, prompt masked with -100, padded by hand on ``padding_side``."""
    rows = []
    for prompt, target in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(f"{prompt} {target}")["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids
        rows.append((full, [IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids):]))
    width = max(len(ids) for ids, _ in rows)
    input_ids, labels, mask = [], [], []
    for ids, labs in rows:
        pad = width - len(ids)

        def padded(values, fill, pad=pad):
            return values + [fill] * pad if padding_side == "right" else [fill] * pad + values

        input_ids.append(padded(ids, PAD))
        labels.append(padded(labs, IGNORE_INDEX))
        mask.append(padded([1] * len(ids), 0))
    mask = torch.tensor(mask)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": mask, "labels": torch.tensor(labels),
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_teacher_forcing_queries_last_prompt_token(kind, padding_side):
    tm, model = edited(kind)
    pairs = [EDITS[0], EDITS[1], (UNEDITED[2], "paris")]
    batch = teacher_forced(tm.tokenizer, pairs, padding_side)
    assert len({len(tm.tokenizer(prompt)["input_ids"]) for prompt, _ in pairs}) == len(pairs), "setup: lengths"
    query = (batch["labels"] != IGNORE_INDEX).int().argmax(-1) - 1
    with recorded_positions(model) as seen, torch.no_grad():
        output = model(**batch)
    assert seen == [query.tolist()]
    assert torch.isfinite(output.loss)
    with model.disable_adapter():
        base = logits_of(model, batch)
    rows = torch.arange(len(pairs))
    predicted = output.logits[rows, query].argmax(-1)
    for row, (prompt, target) in enumerate(pairs):
        if (prompt, target) in EDITS:
            assert base[row, query[row]].argmax() != token(target), "setup: the base model already predicts it"
            assert predicted[row] == token(target)
        else:
            on = batch["attention_mask"][row].bool()
            torch.testing.assert_close(output.logits[row][on], base[row][on], atol=ATOL, rtol=0)


def test_seq2seq_labels_do_not_move_the_encoder_query():
    tm, model = edited("t5", edits=(EDITS[0],))
    inputs = dict(tm.tokenizer([EDITS[0][0]], return_tensors="pt"))
    n = inputs["input_ids"].shape[1]
    labels = torch.full((1, n), IGNORE_INDEX)  # decoder labels that happen to have the encoder's shape
    labels[0, 2:] = token("canberra")
    with recorded_positions(model) as seen, torch.no_grad():
        model(**inputs, labels=labels)
    assert seen == [[n - 1]]


# =================================================================================================== generation
def greedy(model, inputs, use_cache: bool, new: int = 5, scores: bool = False):
    """Greedy token ids; with ``scores``, also the stacked ``(steps, batch, vocab)`` logits of every step."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False, use_cache=use_cache, pad_token_id=PAD,
                             output_logits=scores, return_dict_in_generate=scores)
    return (out.sequences, torch.stack(out.logits)) if scores else out


@pytest.mark.parametrize("replacement", ["replace_last", "replace_all"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_same_with_and_without_cache(kind, replacement):
    tm, model = edited(kind, replacement)
    context = grace_layer(model).call_state
    for prompt in (EDITS[0][0], UNEDITED[0]):
        inputs = dict(tm.tokenizer(prompt, return_tensors="pt"))
        n = inputs["input_ids"].shape[1]
        with recorded_positions(model) as seen_cached:
            cached, cached_logits = greedy(model, inputs, use_cache=True, scores=True)
        with recorded_positions(model) as seen_full:
            full, full_logits = greedy(model, inputs, use_cache=False, scores=True)
        assert context.current is None
        assert cached.tolist() == full.tolist(), f"{prompt!r}: cache changes the generated tokens"
        torch.testing.assert_close(cached_logits, full_logits, atol=1e-4, rtol=0)
        steps = cached.shape[1] - n
        # prefill queries the last prompt token; cached steps never query; uncached steps keep the prompt's token
        assert seen_cached == [[n - 1]] + [None] * (steps - 1)
        assert seen_full == [[n - 1]] * steps
        if prompt == EDITS[0][0]:
            assert cached[0, n] == token(EDITS[0][1])
        else:
            with model.disable_adapter():
                base = greedy(model, inputs, use_cache=True)
            assert cached.tolist() == base.tolist()


@pytest.mark.parametrize(("kind", "replacement"), [("gpt2", "replace_last"), ("llama", "replace_last"),
                                                  ("gpt2", "replace_all")])
def test_batched_generation_with_left_padding(kind, replacement):
    tm, model = edited(kind, replacement)
    tokenizer = make_tokenizer(TEMPLATES[kind], "left")
    prompts = [EDITS[0][0], UNEDITED[2], EDITS[1][0]]
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    width = batch["input_ids"].shape[1]
    cached = greedy(model, batch, use_cache=True)
    with recorded_positions(model) as seen:
        full = greedy(model, batch, use_cache=False)
    assert cached.tolist() == full.tolist()
    assert seen == [[width - 1] * len(prompts)] * (full.shape[1] - width)
    assert cached[0, width] == token(EDITS[0][1])
    assert cached[2, width] == token(EDITS[1][1])
    for row, prompt in enumerate(prompts):
        single = dict(tokenizer(prompt, return_tensors="pt"))
        alone = greedy(model, single, use_cache=True)[0, single["input_ids"].shape[1]:].tolist()
        # the batch row continues with padding once it has finished (eos)
        assert cached[row, width:].tolist() == alone + [PAD] * (5 - len(alone))


def test_generation_on_t5_runs_encoder_once_and_applies_edit():
    tm, model = edited("t5", edits=(EDITS[0],))
    encoder = model.get_base_model().get_encoder()
    calls = []
    handle = encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        inputs = dict(tm.tokenizer(EDITS[0][0], return_tensors="pt"))
        n = inputs["input_ids"].shape[1]
        with recorded_positions(model) as seen:
            out = greedy(model, inputs, use_cache=True, new=3)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert seen == [[n - 1]]
    assert out[0, 1] == token(EDITS[0][1])
    with model.disable_adapter():
        base = greedy(model, inputs, use_cache=True, new=3)
    assert base[0, 1] != token(EDITS[0][1])
    assert grace_layer(model).call_state.current is None
    unedited = dict(tm.tokenizer(UNEDITED[0], return_tensors="pt"))
    ours = greedy(model, unedited, use_cache=True, new=3)
    with model.disable_adapter():
        assert ours.tolist() == greedy(model, unedited, use_cache=True, new=3).tolist()


def test_positions_reset_after_generate():
    tm, model = edited("gpt2")
    context = grace_layer(model).call_state
    short = dict(tm.tokenizer(EDITS[1][0], return_tensors="pt"))  # 3 tokens
    greedy(model, short, use_cache=False)
    assert context.current is None
    long = dict(tm.tokenizer(UNEDITED[0], return_tensors="pt"))  # 5 tokens
    with recorded_positions(model) as seen:
        logits = logits_of(model, long)
    assert seen == [[long["input_ids"].shape[1] - 1]]
    with model.disable_adapter():
        torch.testing.assert_close(logits, logits_of(model, long), atol=ATOL, rtol=0)
    assert context.current is None


class Boom(Exception):
    pass


def fail_after_first_step(input_ids, scores):
    raise Boom


def test_positions_reset_after_a_generate_that_raises():
    tm, model = edited("gpt2")
    context = grace_layer(model).call_state
    short = dict(tm.tokenizer(EDITS[1][0], return_tensors="pt"))
    with recorded_positions(model) as seen, pytest.raises(Boom):
        model.generate(**short, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=PAD,
                       logits_processor=LogitsProcessorList([fail_after_first_step]))
    assert seen == [[2]]  # the prompt forward ran inside the session, then generation failed
    assert context.current is None
    long = dict(tm.tokenizer(UNEDITED[0], return_tensors="pt"))
    with recorded_positions(model) as seen:
        logits_of(model, long)
    assert seen == [[long["input_ids"].shape[1] - 1]]


# =================================================================================================== misplaced targets
class Pooled(nn.Module):
    """The wrapped ``head`` sees one pooled vector per row: no token sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids).mean(1))


class Doubled(Pooled):
    """The wrapped ``head`` sees token sequences of the right length, but twice as many rows as the input."""

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids).repeat(2, 1, 1))


@pytest.mark.parametrize("module", [Pooled, Doubled], ids=["length", "rows"])
def test_target_off_the_token_path_raises(module):
    model = get_peft_model(module(), GraceConfig(target_modules=["head"]))
    with pytest.raises(ValueError, match="does not see the model's token sequence"):
        model(input_ids=torch.ones((2, 5), dtype=torch.long))


def test_failed_forward_leaves_no_stale_query():
    tm = TINY_MODELS["gpt2"]()
    model = get_peft_model(tm.fresh(), GraceConfig(target_modules=[tm.target], eps_init=tm.eps_init))
    context = grace_layer(model).call_state
    ids = torch.tensor([tm.tokenizer(EDITS[1][0])["input_ids"]])
    with pytest.raises(RuntimeError):  # fails inside the model, after the query pre-hook ran
        model(input_ids=ids, position_ids=torch.zeros(1, 7, dtype=torch.long))
    assert context.current is None
    # the layer on its own queries the last token of its input again (the failed call's positions are gone)
    layer = grace_layer(model)
    inputs = torch.randn(1, 2, layer.in_features)
    torch.testing.assert_close(layer(inputs), layer.get_base_layer()(inputs), atol=ATOL, rtol=0)
