"""Edits as model inputs, and model outputs against their labels: one place for what the editor, the scorer and the
Hub card share.

* what is edited (:class:`Task`, :func:`detect_task`) and what an edit is (:class:`Edit`, :func:`as_edit`);
* tokenization (:func:`encode_edit`: the prompt, then the target as the model would generate it) and batching
  (:func:`collate`: causal LMs padded on the left, with position ids from the attention mask);
* scoring a forward against its labels (:func:`causal_shift`, :func:`target_predicted`, :func:`per_row_loss`);
* small facts about a model and tokenizer (:func:`transformers_model`, :func:`is_encoder_decoder`,
  :func:`input_device`, :func:`pad_token_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from enum import Enum
from typing import Any

import torch
from torch import nn

from .query import IGNORE_INDEX


class Task(str, Enum):
    """What kind of model is edited: it decides how edits are tokenized and scored."""

    CAUSAL_LM = "causal_lm"
    SEQ2SEQ_LM = "seq2seq_lm"
    SEQUENCE_CLASSIFICATION = "sequence_classification"


@dataclass(frozen=True)
class Edit:
    """One requested edit: a prompt and what the model should answer (a string, or a class id for classifiers)."""

    prompt: str
    target: str | int
    subject: str | None = None  # what the edit is about, as the prompt spells it (GraceConfig.subject_gate)


EditLike = Edit | tuple | dict


def as_edit(item: EditLike) -> Edit:
    """Accept ``Edit``, ``(prompt, target)``, ``(prompt, target, subject)`` or a dict with ``prompt``, ``target``
    and optionally ``subject``."""
    if isinstance(item, Edit):
        return item
    if isinstance(item, dict):
        if "prompt" not in item or "target" not in item:
            raise ValueError(f"An edit dict needs 'prompt' and 'target' keys, got {sorted(item)}.")
        return Edit(item["prompt"], item["target"], item.get("subject"))
    if isinstance(item, tuple) and len(item) in (2, 3):
        return Edit(*item)
    raise ValueError(f"Cannot read an edit from {item!r}: use Edit(prompt, target, subject=None), (prompt, target) "
                     "or a dict.")


@dataclass
class EncodedEdit:
    """Model inputs for one edit, and the exact token ids that label it in the codebook."""

    inputs: dict[str, torch.Tensor]
    label_ids: torch.Tensor
    prompt_ids: list[int] = dataclass_field(default_factory=list)  # the tokens up to the query, as inference sees them
    gates: list[torch.Tensor] | None = None  # the subject's token sequences (subject_gate)


def detect_task(model: nn.Module) -> Task:
    """Guess the task from a transformers model (pass ``task=`` to :class:`GraceEditor` to override)."""
    base = transformers_model(model)
    if is_encoder_decoder(base):
        return Task.SEQ2SEQ_LM
    if type(base).__name__.endswith("ForSequenceClassification"):
        return Task.SEQUENCE_CLASSIFICATION
    can_generate = getattr(base, "can_generate", None)
    if callable(can_generate) and can_generate():
        return Task.CAUSAL_LM
    raise ValueError(f"Cannot tell how to edit a {type(base).__name__}; pass task='causal_lm', 'seq2seq_lm' or "
                     "'sequence_classification' to GraceEditor.")


def encode_edit(tokenizer, task: Task, prompt: str, target: str | int, *, chat: bool = False,
                subject: str | None = None) -> EncodedEdit:
    """Tokenize one edit. Causal LMs: ``prompt + " " + target`` with only the target tokens labelled (the leading
    space is part of the target, as the model would generate it); with ``chat``, the prompt is first rendered as a
    user turn of the tokenizer's chat template (:func:`chat_prompt`) and the target is the assistant's answer.
    Seq2seq: the target as decoder labels; classifiers: the class id. With a ``subject``, also its gate sequences
    (:func:`subject_gates`)."""
    encoded = _encode_edit(tokenizer, task, prompt, target, chat=chat)
    if subject is not None:
        text = chat_prompt(tokenizer, prompt) if chat else prompt
        encoded.gates = subject_gates(tokenizer, subject, text, encoded.prompt_ids, add_special_tokens=not chat)
    return encoded


def _encode_edit(tokenizer, task: Task, prompt: str, target: str | int, *, chat: bool) -> EncodedEdit:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"An edit needs a non-empty prompt, got {prompt!r}.")
    special = set(tokenizer.all_special_ids)
    if all(token in special for token in tokenizer(prompt, add_special_tokens=False)["input_ids"]):
        raise ValueError(f"The prompt {prompt!r} is only special tokens: give text for the model to continue (the "
                         "target's tokens must follow a prompt of its own).")
    if chat and task is not Task.CAUSAL_LM:
        raise ValueError(f"Chat templates apply to causal LMs, not to a {task.value} model.")
    if task is Task.SEQUENCE_CLASSIFICATION:
        if isinstance(target, bool) or not isinstance(target, int):
            raise ValueError(f"A classifier edit's target is a class id (int), got {target!r}.")
        inputs = tokenizer(prompt, return_tensors="pt")
        label = torch.tensor([target])
        return EncodedEdit({**inputs, "labels": label}, label, inputs["input_ids"][0].tolist())
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"An edit needs a non-empty target string, got {target!r} (prompt {prompt!r}).")
    if task is Task.SEQ2SEQ_LM:
        inputs = tokenizer(prompt, return_tensors="pt")
        labels = tokenizer(text_target=target, return_tensors="pt")["input_ids"]
        return EncodedEdit({**inputs, "labels": labels}, labels[0], inputs["input_ids"][0].tolist())
    if chat:
        prompt_ids, target_ids = causal_lm_token_ids(tokenizer, chat_prompt(tokenizer, prompt), target.strip(),
                                                     add_special_tokens=False)
    else:
        prompt_ids, target_ids = causal_lm_token_ids(tokenizer, prompt, target)
    input_ids = torch.tensor([prompt_ids + target_ids])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt_ids) + target_ids])
    return EncodedEdit(
        {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels},
        torch.tensor(target_ids), list(prompt_ids),
    )


def subject_gates(tokenizer, subject: str, text: str, prompt_ids: list[int], *,
                  add_special_tokens: bool = True) -> list[torch.Tensor]:
    """The token sequences of ``subject`` that gate an edit's entry (:meth:`Codebook.gate_mask`): the prompt's own
    tokens that lie within the subject's characters in ``text`` (the prompt as tokenized into ``prompt_ids``; a
    token merged across the subject's end, as in "F.C.'s", is left out), and the subject tokenized on its own at the
    start of a text and after a space, as given and with its first letter in the other case ("gold" / "Gold's").
    One of them must occur in the prompt."""
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"An edit's subject must be non-empty text, got {subject!r}.")
    subject = subject.strip()
    span = _tokens_within(tokenizer, subject, text, add_special_tokens)
    variants = [span] if span and not set(span) & set(tokenizer.all_special_ids) else []
    cases = dict.fromkeys((subject, subject[0].upper() + subject[1:], subject[0].lower() + subject[1:]))
    special = set(tokenizer.all_special_ids)  # a form the vocabulary lacks comes out as the unknown token
    for form in (form for case in cases for form in (case, " " + case)):
        ids = tokenizer(form, add_special_tokens=False)["input_ids"]
        if ids and ids not in variants and not special & set(ids):
            variants.append(ids)
    if not any(_occurs(variant, prompt_ids) for variant in variants):
        raise ValueError(f"The subject {subject!r} does not occur in the edit's prompt: give the subject as the prompt "
                         "spells it.")
    return [torch.tensor(variant) for variant in variants]


def _tokens_within(tokenizer, subject: str, text: str, add_special_tokens: bool) -> list[int]:
    """The tokens of ``text`` whose characters (leading spaces aside) lie within the first occurrence of ``subject``
    (case-insensitive); empty when it does not occur or the tokenizer gives no character offsets."""
    start = text.lower().find(subject.lower())
    if start < 0 or not getattr(tokenizer, "is_fast", False):
        return []
    end = start + len(subject)
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    inside = []
    for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        first += len(text[first:last]) - len(text[first:last].lstrip())
        if start <= first < last <= end:
            inside.append(token)
    return inside


def _occurs(sequence: list[int], ids: list[int]) -> bool:
    return any(ids[start:start + len(sequence)] == sequence for start in range(len(ids) - len(sequence) + 1))


def chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as a user turn of the tokenizer's chat template, followed by the opening of the assistant's turn
    (the text the model continues with its answer; the last token of it is the GRACE query)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; edit with chat=False, or set "
                         "tokenizer.chat_template.")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def causal_lm_token_ids(tokenizer, prompt: str, target: str, *,
                        add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """Prompt token ids and the target's continuation token ids, as the model sees ``prompt + " " + target`` (no
    space after a prompt that ends in whitespace, such as a chat template's assistant header)."""
    separator = "" if target[:1].isspace() or prompt[-1:].isspace() else " "
    prompt_ids = text_token_ids(tokenizer, prompt, add_special_tokens=add_special_tokens)
    full_ids = text_token_ids(tokenizer, prompt + separator + target, add_special_tokens=add_special_tokens)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids):]
    # the tokenizer merged across the boundary: tokenize the continuation on its own
    return prompt_ids, tokenizer(separator + target, add_special_tokens=False)["input_ids"]


def text_token_ids(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` as a prompt a causal LM continues (without an end-of-sequence token the tokenizer may
    append)."""
    tokens = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    eos = tokenizer.eos_token_id
    return tokens[:-1] if tokens and eos is not None and tokens[-1] == eos else tokens


def encode_prompt(tokenizer, task: Task, prompt: str, *, chat: bool = False) -> dict[str, torch.Tensor]:
    """A prompt alone as inference sees it (one row), tokenized as :func:`encode_edit` tokenizes an edit's prompt:
    its last token is the GRACE query."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"Give a non-empty prompt, got {prompt!r}.")
    if task is not Task.CAUSAL_LM:
        return dict(tokenizer(prompt, return_tensors="pt"))
    ids = (text_token_ids(tokenizer, chat_prompt(tokenizer, prompt), add_special_tokens=False) if chat
           else text_token_ids(tokenizer, prompt))
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def target_predicted(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: is every labelled target token (or the class) the model's argmax? Causal LMs predict token ``t``
    from position ``t - 1``."""
    if task is Task.SEQUENCE_CLASSIFICATION:
        return logits.argmax(-1).to(labels.device) == labels
    predictions = logits.argmax(-1).to(labels.device)
    if task is Task.CAUSAL_LM:
        predictions, labels = causal_shift(predictions, labels)
    labelled = labels != IGNORE_INDEX
    return ((predictions == labels) | ~labelled).all(-1) & labelled.any(-1)


def collate(rows: list[dict[str, torch.Tensor]], task: Task, pad_id: int) -> dict[str, torch.Tensor]:
    """Batch one-row model inputs. Causal LMs are padded on the left (generation continues every row right after
    its prompt) and get position ids from the attention mask, so that padding never shifts absolute positions;
    seq2seq inputs and labels are padded on the right; classifier labels are stacked."""
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    left = task is Task.CAUSAL_LM
    batch = {}
    for name in rows[0]:
        if rows[0][name].dim() == 1:  # one value per row (a class id)
            batch[name] = torch.cat([row[name] for row in rows])
            continue
        sequences = [row[name][0] for row in rows]
        width = max(len(sequence) for sequence in sequences)
        padded = torch.full((len(rows), width), fill.get(name, 0), dtype=sequences[0].dtype)
        for index, sequence in enumerate(sequences):
            if left:
                padded[index, width - len(sequence):] = sequence
            else:
                padded[index, :len(sequence)] = sequence
        batch[name] = padded
    if left and "attention_mask" in batch:
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return batch


def per_row_loss(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's own loss, as the model computes it for that row alone: the mean cross-entropy over its labelled
    tokens (causal LMs predict token ``t`` from position ``t - 1``), or over its class for classifiers."""
    if task is Task.SEQUENCE_CLASSIFICATION:
        return nn.functional.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
    labels = labels.to(logits.device)
    if task is Task.CAUSAL_LM:
        logits, labels = causal_shift(logits, labels)
    tokens = nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                         reduction="none")
    return tokens.sum(-1) / (labels != IGNORE_INDEX).sum(-1).clamp_min(1)


def max_input_length(model: nn.Module) -> int | None:
    """The most tokens the model takes in one sequence (its position table), or None when it has no such limit."""
    config = getattr(transformers_model(model), "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def causal_shift(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its labels: position ``t - 1`` predicts token ``t``."""
    return values[:, :-1], labels[:, 1:]


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def is_encoder_decoder(model_or_config: Any) -> bool:
    """Whether a model (or its config) is an encoder-decoder such as T5."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (the first GPU with ``device_map``)."""
    return model.get_input_embeddings().weight.device


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0
