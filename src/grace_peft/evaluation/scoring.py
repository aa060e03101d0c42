"""Run a model over (prompt, target) pairs in padded batches and score them with :mod:`.metrics` (spec §8).

Pairs are tokenized exactly as the editor tokenizes an edit (:func:`grace_peft.inputs.encode_edit`: for causal
LMs ``prompt + " " + target`` with the leading space inside the target), for teacher forcing and for generation
alike, so a score never suffers from the train/test tokenization mismatch of EasyEdit's generation scorer.
Causal LM batches are left padded; the GRACE query positions follow the attention mask, so a batch scores exactly
what its rows score one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..inputs import EncodedEdit, Task, collate, detect_task, encode_edit, input_device, pad_token_id
from ..query import IGNORE_INDEX
from .metrics import gold_tokens, match_fraction, predicted_tokens


@dataclass
class Predictions:
    """Per pair, the model's tokens at the target positions and the gold target tokens."""

    predicted: list[list[int]]
    gold: list[list[int]]

    def accuracy(self) -> torch.Tensor:
        """Per pair, the fraction of target tokens predicted (Rel, Gen; generation token match)."""
        return match_fraction(self.predicted, self.gold)

    def agreement(self, reference: Predictions) -> torch.Tensor:
        """Per pair, the fraction of ``reference``'s predicted tokens that are unchanged here (Loc)."""
        return match_fraction(self.predicted, reference.predicted)


class Scorer:
    """Runs a causal or seq2seq LM over (prompt, target) pairs, ``batch_size`` pairs per forward pass."""

    def __init__(self, model: nn.Module, tokenizer, *, task: Task | str | None = None, batch_size: int = 16,
                 progress: bool = False, chat: bool = False) -> None:
        self.model = model
        self.chat = chat
        self.tokenizer = tokenizer
        self.task = Task(task) if task is not None else detect_task(model)
        if self.task is Task.SEQUENCE_CLASSIFICATION:
            raise ValueError("Scorer handles causal and seq2seq LMs; score a classifier by comparing "
                             "model(**inputs).logits.argmax(-1) with the class ids.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.progress = progress
        self.pad_id = pad_token_id(tokenizer)

    @torch.no_grad()
    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str], *, desc: str = "scoring") -> Predictions:
        """Teacher forcing: the argmax at each target position given the gold prefix."""
        predicted, gold = [], []
        for chunk in self._chunks(self._encode(prompts, targets), desc):
            inputs = self._collate([edit.inputs for edit in chunk])
            logits = self.model(**inputs).logits
            predicted.extend(row.tolist() for row in predicted_tokens(logits, inputs["labels"], shift=self._shift))
            gold.extend(row.tolist() for row in gold_tokens(inputs["labels"]))
        return Predictions(predicted, gold)

    @torch.no_grad()
    def generated(self, prompts: Sequence[str], targets: Sequence[str], *, desc: str = "generating") -> Predictions:
        """Greedy generation (KV cache on) of as many new tokens as each target has."""
        predicted, gold = [], []
        for chunk in self._chunks(self._encode(prompts, targets), desc):
            target_ids = [edit.label_ids.tolist() for edit in chunk]
            generated = self._generate(chunk, max(map(len, target_ids)))
            predicted.extend(tokens[: len(target)] for tokens, target in zip(generated, target_ids, strict=True))
            gold.extend(target_ids)
        return Predictions(predicted, gold)

    # ------------------------------------------------------------------------------------------ batching
    @property
    def _shift(self) -> bool:
        return self.task is Task.CAUSAL_LM

    def _encode(self, prompts: Sequence[str], targets: Sequence[str]) -> list[EncodedEdit]:
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets.")
        return [encode_edit(self.tokenizer, self.task, prompt, target, chat=self.chat)
                for prompt, target in zip(prompts, targets, strict=True)]

    def _chunks(self, encoded: list[EncodedEdit], desc: str) -> Iterator[list[EncodedEdit]]:
        starts = range(0, len(encoded), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not self.progress or len(starts) < 2,
                          leave=False):
            yield encoded[start:start + self.batch_size]

    def _collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        device = input_device(self.model)
        return {name: tensor.to(device) for name, tensor in collate(rows, self.task, self.pad_id).items()}

    def _generate(self, encoded: list[EncodedEdit], max_new_tokens: int) -> list[list[int]]:
        if self.task is Task.CAUSAL_LM:
            prompts = [{name: tensor[:, :int((edit.inputs["labels"][0] == IGNORE_INDEX).sum())]
                        for name, tensor in edit.inputs.items() if name != "labels"} for edit in encoded]
        else:
            prompts = [{name: tensor for name, tensor in edit.inputs.items() if name != "labels"}
                       for edit in encoded]
        inputs = self._collate(prompts)
        inputs.pop("position_ids", None)  # generate() derives them from the attention mask, step by step
        output = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                     pad_token_id=self.pad_id)
        # causal LMs return prompt + new tokens; seq2seq returns the decoder start token + new tokens
        start = inputs["input_ids"].shape[1] if self.task is Task.CAUSAL_LM else 1
        return output[:, start:].tolist()
