"""Merging the codebooks of two GRACE adapters made for the same base model and layers (``grace-peft merge``).

PEFT-free, like :mod:`grace_peft.codebook`: the entries of one codebook are replayed into another, oldest edit
first, under GRACE's own rules (:meth:`Codebook.update` with each entry's own key, label, value and radius): an entry
whose ball touches no key is added; one that lands on a key with the same label expands it (the key keeps its
value); one that lands on a key with another label splits (or, on an identical key, overwrites). Splits and
overwrites are conflicts between the two adapters and are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .codebook import Codebook, CodebookOperation

__all__ = ["MergeReport", "check_mergeable", "merge_codebook", "merged_edit_ids"]


@dataclass
class MergeReport:
    """What replaying one codebook into another did: entries ``added`` (ADD), ``joined`` to an entry with the same
    label (EXPAND), and ``conflicts`` (SPLIT / OVERWRITE against an entry with another label), one sentence each."""

    added: int = 0
    joined: int = 0
    conflicts: list[str] = field(default_factory=list)


def merged_edit_ids(into: Mapping[str, Codebook], source: Mapping[str, Codebook]) -> dict[int, int]:
    """New ids for the edits of ``source`` (every codebook's), after every id ``into`` has used, in their order."""
    start = max((int(codebook.next_edit_id) for codebook in into.values()), default=0)
    old = sorted(set().union(*(set(codebook.edit_ids.tolist()) for codebook in source.values())))
    return {edit_id: start + rank for rank, edit_id in enumerate(old)}


def check_mergeable(into: Codebook, source: Codebook, module: str) -> None:
    """Refuse codebooks whose keys live in different spaces (widths, key centers)."""
    if (into.key_dim, into.value_dim) != (source.key_dim, source.value_dim):
        raise ValueError(f"{module}: the codebooks have keys/values of width {into.key_dim}/{into.value_dim} and "
                         f"{source.key_dim}/{source.value_dim}; they were made for different models.")
    centers = (into.key_center, source.key_center)
    if (centers[0] is None) != (centers[1] is None) or (centers[0] is not None
                                                       and not torch.equal(centers[0], centers[1])):
        raise ValueError(f"{module}: the codebooks' keys are centred differently (calibrated separately), so their "
                         "distances cannot be compared; calibrate once and edit both adapters from that calibration.")


def merge_codebook(into: Codebook, source: Codebook, new_ids: Mapping[int, int], module: str = "") -> MergeReport:
    """Replay every entry of ``source`` into ``into`` (see the module docstring), each under its new edit id."""
    check_mergeable(into, source, module)
    report = MergeReport()
    texts = {record.edit_id: record.text for record in source.journal.records()}
    where = f"{module}: " if module else ""
    for index in sorted(range(len(source)), key=lambda entry: int(source.edit_ids[entry])):
        old_id = int(source.edit_ids[index])
        label = source.label(index)
        nearest = int(into.nearest(source.keys[index])[0][0]) if len(into) else -1
        nearest_edit = int(into.edit_ids[nearest]) if nearest >= 0 else None
        update = into.update(source.keys[index], label, edit_id=new_ids[old_id], init_value=source.values[index],
                             radius=float(source.radii[index]), text=texts.get(old_id))
        if update.operation is CodebookOperation.ADD:
            report.added += 1
            continue
        if update.operation is CodebookOperation.EXPAND:
            report.joined += 1
            continue
        what = (f"splits with entry {update.nearest} (edit {nearest_edit}, another target) at distance "
                f"{update.distance:.4g}" if update.operation is CodebookOperation.SPLIT else
                f"has the same key as entry {update.index} (edit {nearest_edit}) and replaces its target")
        report.conflicts.append(f"{where}the second adapter's edit {old_id} (now {new_ids[old_id]}, target tokens "
                                f"{label.tolist()}) {what}")
    return report
