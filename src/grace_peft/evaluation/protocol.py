"""Evaluation protocols (spec §8) and the lifelong edit-then-evaluate loop.

Every number carries the name of the protocol it comes from:

- ``teacher_forced``: input ``prompt + " " + target``; the fraction of target tokens whose argmax, given the gold
  prefix, is the gold token. Rel on the edit prompt, Gen on its rephrase. Loc is the fraction of the locality
  answer's argmax tokens that are unchanged from the unedited model (computed before any edit), not accuracy
  against the locality answer.
- ``generation``: greedy ``generate`` (KV cache on) of as many tokens as the target has, matched position-wise;
  Loc compares the generated tokens with the unedited model's.

``upstream`` is accuracy against the locality answers themselves: the paper's TRR (test retention) view.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from statistics import fmean
from typing import Any

from tqdm.auto import tqdm

from ..editing import EditReport, GraceEditor
from .records import EditRecord
from .scoring import Predictions, Scorer


class Protocol(str, Enum):
    """How predictions are obtained: teacher forced, or greedy generation."""

    TEACHER_FORCED = "teacher_forced"
    GENERATION = "generation"


@dataclass
class Scores:
    """Means over records (None where no record has the needed field) and the per-record values behind them."""

    protocol: str
    count: int
    rel: float
    gen: float | None
    loc: float | None
    upstream: float | None
    per_record: dict[str, list[float | None]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "per_record"}

    @classmethod
    def from_per_record(cls, protocol: str, per_record: dict[str, list[float | None]]) -> Scores:
        """The means of per-record values (``rel``, ``gen``, ``loc``, ``upstream``), as :meth:`Evaluator.score`
        computes them."""
        return cls(protocol, len(per_record["rel"]), fmean(per_record["rel"]), _mean(per_record["gen"]),
                   _mean(per_record["loc"]), _mean(per_record["upstream"]), per_record)


@dataclass
class LocalityReference:
    """The unedited model's predictions on the locality prompts, one entry per record (None: no locality pair)."""

    protocol: str
    predictions: list[Predictions | None]

    def subset(self, indices: Iterable[int]) -> LocalityReference:
        """The reference of the records at ``indices`` (in that order)."""
        return LocalityReference(self.protocol, [self.predictions[index] for index in indices])


class Evaluator:
    """Scores records under one protocol. Compute :meth:`locality_reference` before the first edit."""

    def __init__(self, model, tokenizer, *, protocol: Protocol | str = Protocol.TEACHER_FORCED, batch_size: int = 16,
                 progress: bool = False, chat: bool = False) -> None:
        self.protocol = Protocol(protocol)
        self.scorer = Scorer(model, tokenizer, batch_size=batch_size, progress=progress, chat=chat)

    def locality_reference(self, records: Sequence[EditRecord]) -> LocalityReference:
        """The current (unedited) model's predictions on every record's locality prompt and answer."""
        pairs = _locality_pairs(records)
        predictions = self._predict([prompt for _, prompt, _ in pairs], [answer for _, _, answer in pairs], "loc ref")
        by_record: list[Predictions | None] = [None] * len(records)
        for row, (index, _, _) in enumerate(pairs):
            by_record[index] = Predictions([predictions.predicted[row]], [predictions.gold[row]])
        return LocalityReference(self.protocol.value, by_record)

    def score(self, records: Sequence[EditRecord], reference: LocalityReference | None = None) -> Scores:
        """Rel on the prompts, Gen on the rephrases, Loc against ``reference`` and upstream accuracy."""
        if reference is not None and reference.protocol != self.protocol.value:
            raise ValueError(f"The locality reference was computed with the {reference.protocol} protocol, "
                             f"not {self.protocol.value}.")
        if not records:
            raise ValueError("No records to score.")
        rel = self._predict([r.prompt for r in records], [r.target for r in records], "rel").accuracy().tolist()
        gen = _scatter(records, [i for i, r in enumerate(records) if r.rephrase],
                       lambda kept: self._predict([r.rephrase for r in kept], [r.target for r in kept], "gen")
                       .accuracy().tolist())
        pairs = _locality_pairs(records)
        loc: list[float | None] = [None] * len(records)
        upstream: list[float | None] = [None] * len(records)
        if pairs:
            current = self._predict([p for _, p, _ in pairs], [a for _, _, a in pairs], "loc")
            accuracy = current.accuracy().tolist()
            for row, (index, _, _) in enumerate(pairs):
                upstream[index] = accuracy[row]
                if reference is not None and reference.predictions[index] is not None:
                    loc[index] = float(Predictions([current.predicted[row]], [current.gold[row]])
                                       .agreement(reference.predictions[index])[0])
        return Scores.from_per_record(self.protocol.value, {"rel": rel, "gen": gen, "loc": loc, "upstream": upstream})

    def _predict(self, prompts: list[str], targets: list[str], desc: str) -> Predictions:
        if not prompts:
            return Predictions([], [])
        if self.protocol is Protocol.GENERATION:
            return self.scorer.generated(prompts, targets, desc=desc)
        return self.scorer.teacher_forced(prompts, targets, desc=desc)


@dataclass
class LifelongResult:
    """A sequential editing run: the unedited and final scores, immediate scores, checkpoints and edit reports."""

    protocol: str
    unedited: Scores
    final: Scores
    immediate: Scores | None
    checkpoints: list[dict[str, Any]]
    reports: list[EditReport]
    num_keys: int

    def paper_view(self) -> dict[str, float | None]:
        """The GRACE paper's metrics: ES (right after each edit), ERR (all previous edits at the end), TRR
        (upstream accuracy on the locality data, edited and unedited) and Holdout (unseen rephrasings)."""
        return {
            "ES": self.immediate.rel if self.immediate else None,
            "ERR": self.final.rel,
            "TRR": self.final.upstream,
            "TRR_unedited": self.unedited.upstream,
            "Holdout": self.final.gen,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "num_edits": len(self.reports),
            "num_keys": self.num_keys,
            "unedited": asdict(self.unedited),
            "final": asdict(self.final),
            "immediate": asdict(self.immediate) if self.immediate else None,
            "paper_view": self.paper_view(),
            "checkpoints": self.checkpoints,
            "edits": [report.to_dict() for report in self.reports],
        }


def run_lifelong(editor: GraceEditor, records: Sequence[EditRecord], *,
                 protocol: Protocol | str = Protocol.TEACHER_FORCED, batch_size: int = 16, immediate: bool = False,
                 checkpoint_every: int | None = None, edit_batch_size: int = 1,
                 progress: bool = True) -> LifelongResult:
    """Apply ``records`` as sequential edits, then score all of them on the final model ("final" timing).

    ``immediate`` also scores each edit right after it is applied (right after its batch with
    ``edit_batch_size > 1``, see :meth:`GraceEditor.edit_many`); ``checkpoint_every=k`` scores the edits made so far
    whenever another k edits are applied (curves). Loc is always measured against the model as it was before the
    first edit. ``batch_size`` is the evaluation batch size."""
    if not records:
        raise ValueError("No edits to apply.")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
    evaluator = Evaluator(editor.model, editor.tokenizer, protocol=protocol, batch_size=batch_size, progress=progress,
                          chat=editor.chat)
    reference = evaluator.locality_reference(records)
    unedited = evaluator.score(records, reference)
    reports: list[EditReport] = []
    immediate_scores: list[Scores] = []
    checkpoints: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tqdm(total=len(records), desc="GRACE edits", unit="edit", disable=not progress) as bar:
        while len(reports) < len(records):
            first = len(reports)
            chunk = records[first:first + edit_batch_size]
            reports.extend(editor.edit_many([(r.prompt, r.target, r.subject) for r in chunk],
                                            batch_size=edit_batch_size, progress=False))
            count = len(reports)
            if immediate:
                immediate_scores.append(evaluator.score(chunk, reference.subset(range(first, count))))
            if checkpoint_every and (count // checkpoint_every > first // checkpoint_every or count == len(records)):
                scores = evaluator.score(records[:count], reference.subset(range(count)))
                checkpoints.append({"edits": count, "keys": editor.num_keys(),
                                    "seconds": time.perf_counter() - started, **scores.summary()})
            bar.update(count - first)
            bar.set_postfix(keys=editor.num_keys(), took=sum(report.success for report in reports))
    final = evaluator.score(records, reference)
    return LifelongResult(evaluator.protocol.value, unedited, final, _merge(immediate_scores) if immediate else None,
                          checkpoints, reports, editor.num_keys())


def _locality_pairs(records: Sequence[EditRecord]) -> list[tuple[int, str, str]]:
    return [(index, record.locality_prompt, record.locality_answer) for index, record in enumerate(records)
            if record.locality_prompt and record.locality_answer]


def _scatter(records: Sequence[EditRecord], indices: list[int],
             score: Callable[[list[EditRecord]], list[float]]) -> list[float | None]:
    values: list[float | None] = [None] * len(records)
    if indices:
        for index, value in zip(indices, score([records[i] for i in indices]), strict=True):
            values[index] = value
    return values


def _merge(scores: list[Scores]) -> Scores:
    per_record = {key: [value for item in scores for value in item.per_record[key]] for key in scores[0].per_record}
    return Scores.from_per_record(scores[0].protocol, per_record)


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return fmean(present) if present else None
