"""Data-parallel evaluation with accelerate: every process scores a shard of the records, the results are gathered.

Run a script under ``accelerate launch --num_processes N script.py`` (GPUs) or ``torchrun --nproc_per_node N
script.py`` (CPU processes); each process loads the same base model and adapter onto its own device
(``model.to(PartialState().device)``) and calls :func:`evaluate_data_parallel`. Records are split into contiguous
shards with ``PartialState.split_between_processes``, each shard is scored by an :class:`Evaluator`, and the
per-record values are gathered with ``gather_object``, so every process returns the same :class:`Scores` that one
process scoring all records computes, per-record lists in the original order.

Editing stays in one process: every edit changes the codebook that the next edit reads (which key it hits, whether
it adds, expands or splits), so edits are a sequence, not a batch that could be split across processes. Edit in
one process, ``save_pretrained`` the adapter, then load it in every process for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from torch import nn

from .protocol import Evaluator, LocalityReference, Protocol, Scores
from .records import EditRecord

__all__ = ["evaluate_data_parallel", "locality_reference_data_parallel", "process_state"]

T = TypeVar("T")


def process_state() -> PartialState:
    """This process's accelerate state; on machines without CUDA (or under ``accelerate launch --cpu``) the
    processes talk over gloo on the CPU."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def evaluate_data_parallel(model: nn.Module, tokenizer, records: Sequence[EditRecord],
                           reference: LocalityReference | None = None, *,
                           protocol: Protocol | str = Protocol.TEACHER_FORCED, batch_size: int = 16,
                           chat: bool = False, progress: bool = False, state: PartialState | None = None) -> Scores:
    """Score ``records`` (Rel, Gen, Loc against ``reference``, upstream) across all processes; every process gets
    the full :class:`Scores`. ``reference`` holds one entry per record (:func:`locality_reference_data_parallel`)."""
    if not records:
        raise ValueError("No records to score.")
    if reference is not None and len(reference.predictions) != len(records):
        raise ValueError(f"The locality reference has {len(reference.predictions)} entries for {len(records)} "
                         "records; compute it on the same records.")
    state = state or process_state()
    evaluator = Evaluator(model, tokenizer, protocol=protocol, batch_size=batch_size,
                          progress=progress and state.is_main_process, chat=chat)

    def score(indices: list[int]) -> list[dict[str, float | None]]:
        shard = evaluator.score([records[index] for index in indices],
                                reference.subset(indices) if reference is not None else None)
        return [{metric: values[row] for metric, values in shard.per_record.items()} for row in range(len(indices))]

    rows = _sharded(state, len(records), score)
    per_record = {metric: [row[metric] for row in rows] for metric in rows[0]}
    return Scores.from_per_record(evaluator.protocol.value, per_record)


def locality_reference_data_parallel(model: nn.Module, tokenizer, records: Sequence[EditRecord], *,
                                     protocol: Protocol | str = Protocol.TEACHER_FORCED, batch_size: int = 16,
                                     chat: bool = False, state: PartialState | None = None) -> LocalityReference:
    """The unedited model's locality predictions (:meth:`Evaluator.locality_reference`), computed across all
    processes. For a loaded adapter, the unedited model is the same model under ``model.disable_adapter()``."""
    state = state or process_state()
    evaluator = Evaluator(model, tokenizer, protocol=protocol, batch_size=batch_size, chat=chat)
    predictions = _sharded(state, len(records), lambda indices: evaluator.locality_reference(
        [records[index] for index in indices]).predictions)
    return LocalityReference(evaluator.protocol.value, predictions)


def _sharded(state: PartialState, count: int, compute: Callable[[list[int]], list[T]]) -> list[T]:
    """``compute`` over this process's contiguous shard of ``range(count)``, gathered from every process and put
    back in index order (a process whose shard is empty contributes nothing)."""
    # Our own split, not accelerate's split_between_processes: older releases hand an idle process a duplicate.
    size, extra = divmod(count, state.num_processes)
    start = state.process_index * size + min(state.process_index, extra)
    indices = list(range(start, start + size + (state.process_index < extra)))
    rows: list[tuple[int, Any]] = list(zip(indices, compute(indices), strict=True)) if indices else []
    gathered = sorted(gather_object(rows), key=lambda row: row[0])
    if [index for index, _ in gathered] != list(range(count)):
        raise RuntimeError(f"Gathered {len(gathered)} results for {count} records: a process scored another list.")
    return [value for _, value in gathered]
