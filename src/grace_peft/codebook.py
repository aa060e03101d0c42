"""The GRACE codebook and the rules that change it (spec §2).

This module knows nothing about PEFT or transformers: a :class:`Codebook` holds keys, values, radii, labels and
edit ids as plain tensors, searches them, and applies one edit at a time with ADD / EXPAND / SPLIT (and OVERWRITE
for the degenerate case of a query identical to a key with another label).

Rules, with ``d`` the distance from the query to its nearest key ``i`` and ``E_i`` that key's radius:

* hit at inference: ``d <= E_i`` for the nearest key; ties in distance go to the older key (lower index);
* ADD: empty codebook, or ``d > eps_init + E_i`` (the query's ``eps_init`` ball would not touch key ``i``'s);
* EXPAND: overlap and the same label (exact token ids); the radius grows per ``ExpandRule``;
* SPLIT: overlap and another label. ``SplitRule.HALVE`` (the paper): ``E_i = min(E_i, d / 2)`` (a split never
  grows a ball) and the new key gets ``d / 2``; the two balls then touch at most in one point, which is a hit for
  the older key only. ``SplitRule.KEEP``: ``E_i`` stays and the new key gets ``eps_init``; the balls overlap, and
  since a query only ever retrieves its nearest key, the bisector between the two keys separates the labels
  (halving takes coverage away from both edits without changing which key a query retrieves);
* OVERWRITE: ``d == 0`` exactly and another label; the entry takes the new label and a fresh value, since a
  split would leave two identical keys of radius 0 and the new one could never be retrieved.

All distances are computed in float32, whatever the dtype of the queries.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from .journal import DEFAULT_LIMIT, NONE, EditJournal, JournalRecord, prepare_journal_load, saved_journal_problem
from .journal import PREFIX as JOURNAL_PREFIX

EXACT_SEARCH_UP_TO = 64  # keys: below this, measuring every key exactly is as fast as screening
MAX_EXACT_CANDIDATES = 256  # keys per query the screen may leave to measure exactly before it is skipped

__all__ = ["Codebook", "CodebookContentError", "CodebookOperation", "CodebookShapeError", "CodebookUpdate",
           "ExpandRule", "Removal", "SplitRule"]


class CodebookOperation(str, Enum):
    """What one edit did to one codebook."""

    ADD = "add"
    EXPAND = "expand"
    SPLIT = "split"
    OVERWRITE = "overwrite"


class ExpandRule(str, Enum):
    """How EXPAND grows the nearest key's ball so that it covers the query."""

    COVERAGE = "coverage"  # E_i = max(E_i, d): the authors' code
    PAPER = "paper"  # E_i = E_i + eps_init
    MOVING_AVERAGE = "moving_average"  # key moves halfway to the query, E_i = max(E_i, d / 2)


class SplitRule(str, Enum):
    """What SPLIT does to the radii when a new edit's ball overlaps a key with another label."""

    HALVE = "halve"  # both radii become d / 2 at most: the paper
    KEEP = "keep"  # the old radius stays, the new key gets eps_init: nearest-key retrieval separates them


class CodebookShapeError(ValueError):
    """A saved codebook does not fit the layer it is loaded into."""


class CodebookContentError(ValueError):
    """A saved codebook holds values no codebook can have (NaN keys, negative radii, float labels, ...)."""


@dataclass(frozen=True)
class CodebookUpdate:
    """The outcome of :meth:`Codebook.update`.

    ``index`` is the entry whose value should now be trained; ``nearest`` and ``distance`` describe the nearest key
    before the update (``None`` for an empty codebook).
    """

    operation: CodebookOperation
    index: int
    nearest: int | None
    distance: float | None


@dataclass
class Removal:
    """What taking an edit back (:meth:`Codebook.remove_edit`) did: ``restored`` lists what went back to its state
    before the edit, ``not_restored`` what could not (a later edit changed it since), one sentence each."""

    edit_id: int
    restored: list[str] = field(default_factory=list)
    not_restored: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether everything the edit created or changed is as before it."""
        return not self.not_restored

    def extend(self, other: Removal, prefix: str = "") -> None:
        """Add ``other``'s sentences (of another codebook), each after ``prefix``."""
        self.restored += [prefix + line for line in other.restored]
        self.not_restored += [prefix + line for line in other.not_restored]

    def summary(self) -> str:
        lines = [f"Edit {self.edit_id} taken back" + ("." if self.complete else ", in part:")]
        lines += [f"  restored: {line}" for line in self.restored]
        lines += [f"  NOT restored: {line}" for line in self.not_restored]
        return "\n".join(lines)


_FLOAT_TENSORS = ("keys", "values", "radii", "key_center")
_INT_TENSORS = ("label_tokens", "label_lengths", "edit_ids", "gate_tokens", "gate_lengths", "gate_owners")
_ROW_TENSORS = ("keys", "values", "radii", "label_tokens", "label_lengths", "edit_ids")  # per entry (label_tokens: per
# label token)
_GATE_TENSORS = ("gate_tokens", "gate_lengths", "gate_owners")  # per gate token / per variant; absent before gates


class Codebook(nn.Module):
    """Keys (layer inputs), values (replacement outputs), radii, labels and edit ids of one GRACE adaptor.

    ``values`` is the only parameter; everything else is a persistent buffer. All floating tensors are float32.
    Labels are stored ragged: ``label_tokens`` holds the token ids of all labels back to back and
    ``label_lengths`` says how many belong to each entry. ``next_edit_id`` is the first id not yet used.
    An entry may be gated (see :meth:`gate_mask`): ``gate_tokens`` holds token sequences back to back,
    ``gate_lengths`` their lengths and ``gate_owners`` the entry each belongs to; a gated entry can only be retrieved
    by a prompt that contains one of its sequences (its edit's subject), an entry without any is never vetoed.
    ``size``, ``label_size``, ``gate_size`` (gate tokens, sequences) and ``journal`` pre-allocate a codebook that is
    about to load a saved one. With
    ``key_center=True`` it also holds ``key_center``, a vector that key functions subtract from pooled inputs
    (see :mod:`grace_peft.keys`), zero until calibrated. ``journal`` (an :class:`~grace_peft.journal.EditJournal`
    of at most ``journal_limit`` records) records what every edit did, so that one can be taken back
    (:meth:`remove_edit`).
    """

    keys: torch.Tensor
    radii: torch.Tensor
    label_tokens: torch.Tensor
    label_lengths: torch.Tensor
    edit_ids: torch.Tensor
    next_edit_id: torch.Tensor
    key_center: torch.Tensor | None

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        *,
        eps_init: float,
        expand_rule: ExpandRule | str = ExpandRule.COVERAGE,
        split_rule: SplitRule | str = SplitRule.HALVE,
        key_center: bool = False,
        size: int = 0,
        label_size: int | None = None,
        gate_size: tuple[int, int] = (0, 0),
        journal: Mapping[str, int] | None = None,
        journal_limit: int = DEFAULT_LIMIT,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not eps_init > 0 or eps_init == float("inf"):
            raise ValueError(f"eps_init must be a positive finite number, got {eps_init}.")
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.eps_init = float(eps_init)
        self.expand_rule = ExpandRule(expand_rule)
        self.split_rule = SplitRule(split_rule)
        f32 = {"dtype": torch.float32, "device": device}
        i64 = {"dtype": torch.int64, "device": device}
        self.register_buffer("keys", torch.zeros(size, key_dim, **f32))
        self.values = nn.Parameter(torch.zeros(size, value_dim, **f32))
        self.register_buffer("radii", torch.zeros(size, **f32))
        self.register_buffer("label_tokens", torch.zeros(size if label_size is None else label_size, **i64))
        self.register_buffer("label_lengths", torch.ones(size, **i64))
        self.register_buffer("edit_ids", torch.zeros(size, **i64))
        self.register_buffer("next_edit_id", torch.zeros((), **i64))
        self.register_buffer("gate_tokens", torch.zeros(gate_size[0], **i64))
        self.register_buffer("gate_lengths", torch.ones(gate_size[1], **i64))
        self.register_buffer("gate_owners", torch.zeros(gate_size[1], **i64))
        self.register_buffer("key_center", torch.zeros(key_dim, **f32) if key_center else None)
        self.journal = EditJournal(self, key_dim, value_dim, limit=journal_limit, shape=journal, device=device)

    def __len__(self) -> int:
        return self.keys.shape[0]

    def shape_record(self) -> dict[str, int]:
        """The sizes a fresh codebook needs to load this one's state dict (``Codebook(..., **shape_record)``)."""
        return {"size": len(self), "label_size": self.label_tokens.shape[0],
                "gate_size": [self.gate_tokens.shape[0], self.gate_lengths.shape[0]],
                "journal": self.journal.shape_record()}

    def extra_repr(self) -> str:
        return (
            f"entries={len(self)}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"eps_init={self.eps_init}, expand_rule={self.expand_rule.value}, split_rule={self.split_rule.value}"
        )

    # ----------------------------------------------------------------------------------------------- search
    def nearest(self, queries: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest key of each query row: ``(index, distance)``, both of shape ``(B,)``.

        Distances are exact float32 Euclidean distances, ``|q - k|``: a query equal to a key is at distance 0, and
        equal distances go to the lower index. An empty codebook gives index -1 and distance inf. ``allowed``
        (``(B, entries)`` or ``(entries,)`` booleans, from :meth:`gate_mask`) restricts each row to those entries (-1
        and inf for a row with none). The search screens every key by a matrix product (``|q|^2 - 2qk + |k|^2``,
        fast but inexact: it cancels catastrophically for nearby keys far from the origin) and then measures exactly
        every key that the screen's error bound cannot rule out, so the result is that of the exact distance to
        every key.
        """
        queries = self._as_queries(queries)
        batch = queries.shape[0]
        index = torch.full((batch,), -1, dtype=torch.int64, device=queries.device)
        distance = torch.full((batch,), float("inf"), dtype=torch.float32, device=queries.device)
        if len(self) == 0:
            return index, distance
        if allowed is None:
            return self._nearest_among(queries, None)
        allowed = allowed.to(device=self.keys.device, dtype=torch.bool).expand(batch, len(self))
        for row in range(batch):
            subset = allowed[row].nonzero().flatten()
            if len(subset) == 0:
                continue
            found, gap = self._nearest_among(queries[row:row + 1], None if len(subset) == len(self) else subset)
            index[row] = found[0] if len(subset) == len(self) else subset[found[0]]
            distance[row] = gap[0]
        return index, distance

    def _nearest_among(self, queries: torch.Tensor, subset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`nearest` over every key, or over the keys at the (ascending) indices ``subset``; indices count
        within ``subset``."""
        keys = self.keys if subset is None else self.keys[subset]
        if len(keys) <= EXACT_SEARCH_UP_TO or not torch.isfinite(queries).all():
            return _exact_nearest(queries, keys)
        query_norms = queries.pow(2).sum(-1, keepdim=True)
        key_norms = self._squared_key_norms() if subset is None else self._squared_key_norms()[subset]
        screened = torch.addmm(key_norms.unsqueeze(0), queries, keys.T, alpha=-2).add_(query_norms)
        # Rounding error of each screened squared distance: at most (d + 3) u (|q| + |k|)^2 for float32 sums of d
        # products (u = 2^-24); doubled for safety. A key whose screened value exceeds the best one by more than
        # twice that cannot be the nearest.
        reach = query_norms.sqrt() + key_norms.max().sqrt()
        slack = 2 * (self.key_dim + 3) * torch.finfo(torch.float32).eps / 2 * reach.pow(2)
        best = screened.min(-1, keepdim=True).values
        kept = screened <= best + 2 * slack
        width = int(kept.sum(-1).max())
        if width > MAX_EXACT_CANDIDATES:  # keys too alike for the screen to help (e.g. far from the origin)
            return _exact_nearest(queries, keys)
        candidates = screened.masked_fill(~kept, float("inf")).topk(width, largest=False).indices
        distances = torch.cdist(queries[:, None, :], keys[candidates],
                                compute_mode="donot_use_mm_for_euclid_dist").squeeze(1)
        distances = distances.masked_fill(~kept.gather(1, candidates), float("inf"))
        distance = distances.min(-1).values
        tied = distances == distance[:, None]
        index = torch.where(tied, candidates, torch.full_like(candidates, len(keys))).min(-1).values
        return index, distance

    def gate_mask(self, prompts: list[list[int]]) -> torch.Tensor | None:
        """Which entries each prompt (its token ids) may retrieve, ``(len(prompts), entries)`` booleans: an entry
        without gate sequences always, a gated one when one of its sequences occurs in the prompt, contiguously.
        ``None`` when no entry is gated (nothing to restrict)."""
        if self.gate_owners.numel() == 0:
            return None
        table = self._gate_table()
        lengths = sorted({len(sequence) for sequence in table})
        ungated = torch.ones(len(self), dtype=torch.bool)
        ungated[self.gate_owners.cpu()] = False
        mask = ungated.repeat(len(prompts), 1)
        for row, ids in enumerate(prompts):
            for length in lengths:
                for start in range(len(ids) - length + 1):
                    owners = table.get(tuple(ids[start:start + length]))
                    if owners:
                        mask[row, owners] = True
        return mask.to(self.keys.device)

    def lookup(self, queries: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the entry each query row retrieves, or -1 where it defers to the layer (shape ``(B,)``);
        ``allowed`` as for :meth:`nearest`."""
        index, distance = self.nearest(queries, allowed)
        if len(self) == 0:
            return index
        hit = distance <= self.radii[index.clamp_min(0)]  # NaN and inf distances compare False: no hit
        return torch.where(hit, index, torch.full_like(index, -1))

    def label(self, index: int) -> torch.Tensor:
        """Token ids of the label of entry ``index``."""
        start, end = self._label_span(index)
        return self.label_tokens[start:end]

    # ----------------------------------------------------------------------------------------------- update
    def update(
        self, query: torch.Tensor, label: torch.Tensor, *, edit_id: int, init_value: torch.Tensor,
        radius: float | None = None, text: dict[str, Any] | None = None,
        gates: list[torch.Tensor] | None = None, allowed: torch.Tensor | None = None,
    ) -> CodebookUpdate:
        """Apply one edit (``query`` of shape ``(key_dim,)``, ``label`` token ids) and say what happened.

        ``init_value`` is the value a new entry starts from (ignored by EXPAND, which keeps training the value it
        already has). The caller trains the value at ``CodebookUpdate.index`` afterwards (:meth:`set_value`).
        ``radius`` is the edit's own ball (default ``eps_init``): what a new entry gets and what decides whether
        the edit reaches an existing key (a merge replays entries with the radii they had). The journal records
        the update, with ``text`` (the edit's prompt and target, when the user keeps them). ``gates``: token
        sequences a new entry is gated by (:meth:`gate_mask`); ``allowed``: the entries the edit's own prompt may
        retrieve (``(entries,)``), the only ones it can reach.
        """
        query = self._as_queries(query).squeeze(0)
        if not torch.isfinite(query).all():
            raise ValueError("The query activation contains NaN or inf; the model's forward pass is broken here.")
        label = self._as_label(label)
        init_value = init_value.detach().to(device=self.keys.device, dtype=torch.float32).reshape(self.value_dim)
        radius = self.eps_init if radius is None else float(radius)
        self.next_edit_id.fill_(max(int(self.next_edit_id), edit_id + 1))
        record = JournalRecord(edit_id, CodebookOperation.ADD.value, -1, label, text=text)

        if len(self) == 0:
            record.entry = self._append(query, init_value, radius, label, edit_id, gates)
            return self._recorded(record)
        index, distance = self.nearest(query.unsqueeze(0), allowed)
        i, d = int(index), float(distance)
        if i < 0:  # no entry this prompt may retrieve
            record.entry = self._append(query, init_value, radius, label, edit_id, gates)
            return self._recorded(record)
        record.nearest, record.distance = i, d
        if not d <= radius + float(self.radii[i]):
            record.entry = self._append(query, init_value, radius, label, edit_id, gates)
            return self._recorded(record)
        record.changed, record.radius_before = i, float(self.radii[i])
        if torch.equal(self.label(i), label):
            record.operation, record.entry = CodebookOperation.EXPAND.value, i
            record.value_before = self.values[i].detach().clone()
            if self.expand_rule is ExpandRule.MOVING_AVERAGE:
                record.key_before = self.keys[i].clone()
            self._expand(i, query, d)
            if self.expand_rule is ExpandRule.MOVING_AVERAGE:
                record.key_after = self.keys[i].clone()
        elif d == 0.0:
            record.operation, record.entry = CodebookOperation.OVERWRITE.value, i
            record.value_before, record.label_before = self.values[i].detach().clone(), self.label(i).clone()
            record.edit_id_before, record.value_after = int(self.edit_ids[i]), init_value
            self._set_label(i, label)
            self.edit_ids[i] = edit_id
            self.values.data[i] = init_value  # not set_value: this edit's record is not in the journal yet
        else:
            record.operation = CodebookOperation.SPLIT.value
            if self.split_rule is SplitRule.KEEP:
                record.changed, record.radius_before = -1, NONE
                record.entry = self._append(query, init_value, radius, label, edit_id, gates)
            else:
                self.radii[i] = min(float(self.radii[i]), d / 2)
                record.entry = self._append(query, init_value, d / 2, label, edit_id, gates)
        if record.changed >= 0:
            record.radius_after = float(self.radii[i])
        return self._recorded(record)

    def reaches(self, index: int, distance: float) -> bool:
        """Whether an edit whose query lies at ``distance`` from key ``index`` interacts with that entry (EXPAND,
        SPLIT or OVERWRITE) rather than adding a free-standing one: the two balls overlap."""
        return distance <= self.eps_init + float(self.radii[index])

    @torch.no_grad()
    def set_value(self, index: int, value: torch.Tensor) -> None:
        """Store a (trained) value for entry ``index``."""
        self.values[index] = value.detach().to(self.values.device, torch.float32).reshape(self.value_dim)
        self.journal.note_value(index, self.values[index])

    def neighbours(self, query: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` keys nearest to one query (fewer when the codebook is smaller): ``(indices, distances)``,
        nearest first, by the exact distance (ties to the lower index)."""
        query = self._as_queries(query)[:1]
        if len(self) == 0 or count < 1:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        distances = torch.cdist(query, self.keys, compute_mode="donot_use_mm_for_euclid_dist")[0]
        order = sorted(range(len(self)), key=lambda index: (float(distances[index]), index))[:count]
        indices = torch.tensor(order, dtype=torch.int64)
        return indices, distances[indices.to(distances.device)].cpu()

    @torch.no_grad()
    def remove_edit(self, edit_id: int) -> Removal:
        """Take edit ``edit_id`` back from its journal record: the entry it created leaves the codebook, and every
        part of an entry it changed (radius, key, value, label) goes back to its state before the edit, unless a
        later edit changed that part since (then it stays, and the :class:`Removal` says so). When no later edit
        touched those entries or found one of them nearest, with this edit or without it (so none was placed by
        them), the codebook equals that of the same edits without this one (ids are never reused: ``next_edit_id``
        stays). Raises ``KeyError`` when the journal holds no record of the edit."""
        positions = self.journal.positions_of(edit_id)
        if not positions:
            raise KeyError(edit_id)
        records = self.journal.records()
        removal = Removal(edit_id)
        doomed: list[int] = []
        for position in positions:
            record, later = records[position], records[position + 1:]
            if record.changed >= 0:
                self._restore_changed(record, later, removal)
            if record.created:
                self._remove_created(record, later, removal, doomed)
        self.journal.write([record for position, record in enumerate(records) if position not in positions])
        for index in sorted(doomed, reverse=True):
            self._delete(index)
        return removal

    # ----------------------------------------------------------------------------------------------- internals
    def _recorded(self, record: JournalRecord) -> CodebookUpdate:
        self.journal.append(record)
        nearest = None if record.nearest < 0 else record.nearest
        distance = None if nearest is None else record.distance
        return CodebookUpdate(CodebookOperation(record.operation), record.entry, nearest, distance)

    def _restore_changed(self, record: JournalRecord, later: list[JournalRecord], removal: Removal) -> None:
        index = record.changed
        changers = ", ".join(str(other.edit_id) for other in later if other.touches(index)) or "none"
        kept = f"entry {index}'s {{}} stays as later edit(s) {changers} left it"
        if record.radius_before != record.radius_after:
            if self.radii[index] == record.radius_after:
                self.radii[index] = record.radius_before
                removal.restored.append(f"entry {index}'s radius is back to {record.radius_before:.6g}")
            else:
                removal.not_restored.append(kept.format("radius"))
        if record.key_before is not None:
            if torch.equal(self.keys[index], record.key_after):
                self.keys[index] = record.key_before
                self._forget_key_norms()
                removal.restored.append(f"entry {index}'s key is back where it was")
            else:
                removal.not_restored.append(kept.format("key"))
        if record.label_before is not None:
            if torch.equal(self.label(index), record.target) and int(self.edit_ids[index]) == record.edit_id:
                self._set_label(index, record.label_before)
                self.edit_ids[index] = record.edit_id_before
                removal.restored.append(f"entry {index}'s label and edit id are back to edit {record.edit_id_before}")
            else:
                removal.not_restored.append(kept.format("label"))
        if record.value_before is not None:
            if torch.equal(self.values[index], record.value_after):
                self.values.data[index] = record.value_before
                removal.restored.append(f"entry {index}'s value is back to its state before the edit")
            else:
                removal.not_restored.append(kept.format("value"))

    def _remove_created(self, record: JournalRecord, later: list[JournalRecord], removal: Removal,
                        doomed: list[int]) -> None:
        index = record.entry
        if index < 0:
            removal.restored.append("the entry it created had already left the codebook")
            return
        takeover = next((other for other in later if other.operation == "overwrite" and other.entry == index), None)
        if takeover is not None:
            removal.not_restored.append(f"entry {index}, which it created, now belongs to edit {takeover.edit_id} "
                                        "(an identical key with another target): left in place")
            return
        doomed.append(index)
        removal.restored.append(f"entry {index}, which it created, is removed")
        for other in later:
            if other.operation == "expand" and other.entry == index:
                removal.not_restored.append(
                    f"edit {other.edit_id} had grown entry {index} (same target) and loses it too: apply it again")
            elif other.operation == "split" and other.changed == index:
                removal.not_restored.append(
                    f"edit {other.edit_id}'s entry keeps the radius its split with entry {index} gave it")

    @torch.no_grad()
    def _delete(self, index: int) -> None:
        start, end = self._label_span(index)
        keep = torch.arange(len(self), device=self.keys.device) != index
        self.keys = self.keys[keep]
        self.values = nn.Parameter(self.values.detach()[keep], requires_grad=self.values.requires_grad)
        self.radii = self.radii[keep]
        self.label_tokens = torch.cat([self.label_tokens[:start], self.label_tokens[end:]])
        self.label_lengths = self.label_lengths[keep]
        self.edit_ids = self.edit_ids[keep]
        owned = self.gate_owners == index
        token_owned = owned.repeat_interleave(self.gate_lengths)
        self.gate_tokens = self.gate_tokens[~token_owned]
        self.gate_lengths = self.gate_lengths[~owned]
        self.gate_owners = self.gate_owners[~owned] - (self.gate_owners[~owned] > index).long()
        self.journal.entry_removed(index)

    def _squared_key_norms(self) -> torch.Tensor:
        """``|k|^2`` of every key, kept until the keys change (a search then reads the keys once, not twice). A
        new keys tensor (append, resize, move) is a new object; the two in-place writes forget the norms."""
        cached = self.__dict__.get("_key_norms")
        if cached is None or cached[0]() is not self.keys:
            cached = (weakref.ref(self.keys), torch.einsum("ij,ij->i", self.keys, self.keys))
            self.__dict__["_key_norms"] = cached
        return cached[1]

    def _forget_key_norms(self) -> None:
        self.__dict__.pop("_key_norms", None)

    def _gate_table(self) -> dict[tuple[int, ...], list[int]]:
        """Gate sequence -> the entries it opens, kept until the gates change (new tensors; a load forgets it)."""
        cached = self.__dict__.get("_gate_lookup")
        if cached is None or cached[0]() is not self.gate_owners:
            table: dict[tuple[int, ...], list[int]] = {}
            tokens, start = self.gate_tokens.tolist(), 0
            for length, owner in zip(self.gate_lengths.tolist(), self.gate_owners.tolist(), strict=True):
                table.setdefault(tuple(tokens[start:start + length]), []).append(owner)
                start += length
            cached = (weakref.ref(self.gate_owners), table)
            self.__dict__["_gate_lookup"] = cached
        return cached[1]

    def _as_queries(self, queries: torch.Tensor) -> torch.Tensor:
        queries = queries.detach().to(device=self.keys.device, dtype=torch.float32)
        if queries.dim() == 1:
            queries = queries.unsqueeze(0)
        if queries.dim() != 2 or queries.shape[-1] != self.key_dim:
            raise ValueError(f"Queries must have shape (batch, {self.key_dim}), got {tuple(queries.shape)}.")
        return queries

    def _as_label(self, label: torch.Tensor | list[int] | int) -> torch.Tensor:
        label = torch.as_tensor(label, dtype=torch.int64, device=self.keys.device).reshape(-1)
        if label.numel() == 0:
            raise ValueError("An edit label must have at least one token id.")
        return label

    def _label_span(self, index: int) -> tuple[int, int]:
        start = int(self.label_lengths[:index].sum())
        return start, start + int(self.label_lengths[index])

    def _set_label(self, index: int, label: torch.Tensor) -> None:
        start, end = self._label_span(index)
        self.label_tokens = torch.cat([self.label_tokens[:start], label, self.label_tokens[end:]])
        self.label_lengths[index] = label.numel()

    @torch.no_grad()
    def _expand(self, index: int, query: torch.Tensor, distance: float) -> None:
        radius = float(self.radii[index])
        if self.expand_rule is ExpandRule.COVERAGE:
            self.radii[index] = max(radius, distance)
        elif self.expand_rule is ExpandRule.PAPER:
            self.radii[index] = radius + self.eps_init
        else:
            self.keys[index] = (self.keys[index] + query) / 2
            self._forget_key_norms()
            self.radii[index] = max(radius, distance / 2)

    @torch.no_grad()
    def _append(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: torch.Tensor, edit_id: int,
                gates: list[torch.Tensor] | None = None) -> int:
        device = self.keys.device
        if gates:
            sequences = [gate.to(device, torch.int64).reshape(-1) for gate in gates]
            self.gate_tokens = torch.cat([self.gate_tokens, *sequences])
            self.gate_lengths = torch.cat([self.gate_lengths, torch.tensor([len(g) for g in sequences], device=device)])
            self.gate_owners = torch.cat([self.gate_owners, torch.full((len(sequences),), len(self), device=device)])
        self.keys = torch.cat([self.keys, key.unsqueeze(0)])
        self.values = nn.Parameter(torch.cat([self.values.detach(), value.unsqueeze(0)]),
                                   requires_grad=self.values.requires_grad)
        self.radii = torch.cat([self.radii, torch.tensor([radius], dtype=torch.float32, device=device)])
        self.label_tokens = torch.cat([self.label_tokens, label])
        self.label_lengths = torch.cat([self.label_lengths, torch.tensor([label.numel()], device=device)])
        self.edit_ids = torch.cat([self.edit_ids, torch.tensor([edit_id], device=device)])
        return len(self) - 1

    def _resize_to(self, name: str, rows: int) -> None:
        current = getattr(self, name)
        empty = torch.zeros((rows, *current.shape[1:]), dtype=current.dtype, device=current.device)
        if name == "values":
            self.values = nn.Parameter(empty, requires_grad=current.requires_grad)
        else:
            setattr(self, name, empty)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A codebook grows: resize along dim 0 to the saved size before torch compares shapes. Check every tensor
        # first, so that a refused load changes nothing.
        present = [name for name in (*_ROW_TENSORS, *_GATE_TENSORS) if prefix + name in state_dict]
        module = prefix.split(".grace_codebook.")[0]  # the wrapping module, as the loading model names it
        for name in present:
            saved, current = state_dict[prefix + name], getattr(self, name)
            if saved.dim() != current.dim() or saved.shape[1:] != current.shape[1:]:
                needed = ", ".join(["n", *map(str, current.shape[1:])])
                raise CodebookShapeError(
                    f"The GRACE codebook saved for module '{module}' does not fit this model: its '{name}' has shape "
                    f"{tuple(saved.shape)}, but this module's codebook needs ({needed})"
                    f" (layer input width {self.key_dim}, output width {self.value_dim}). The adapter was saved for a "
                    "model with other layer shapes; load it onto the base model it was made for."
                )
        if self.key_center is not None and prefix + "key_center" in state_dict:
            center = state_dict[prefix + "key_center"]
            if tuple(center.shape) != (self.key_dim,):
                raise CodebookShapeError(
                    f"The GRACE codebook saved for module '{module}' does not fit this model: its 'key_center' has "
                    f"shape {tuple(center.shape)}, but this module needs ({self.key_dim},). The adapter was saved for "
                    "a model with other layer shapes; load it onto the base model it was made for.")
            present.append("key_center")
        saved = {name: state_dict[prefix + name] for name in (*present, "next_edit_id") if prefix + name in state_dict}
        saved.update({key.removeprefix(prefix): tensor for key, tensor in state_dict.items()
                      if key.startswith(prefix + JOURNAL_PREFIX)})
        problem = saved_codebook_problem(saved)
        if problem is not None:
            raise corrupt_codebook_error(module, problem)
        for name, tensor in saved.items():  # a loader that assigns tensors (low_cpu_mem_usage) keeps saved dtypes
            if not name.startswith(JOURNAL_PREFIX):  # converted below
                state_dict[prefix + name] = tensor.to(torch.float32 if name in _FLOAT_TENSORS else torch.int64)
        prepare_journal_load(self.journal, state_dict, prefix)
        if not any(prefix + name in state_dict for name in _GATE_TENSORS):  # saved before gates: none
            for name in _GATE_TENSORS:
                state_dict[prefix + name] = torch.zeros(0, dtype=torch.int64, device=getattr(self, name).device)
                present.append(name)
        for name in present:
            if name == "key_center":
                continue
            rows = state_dict[prefix + name].shape[0]
            if rows != getattr(self, name).shape[0]:
                self._resize_to(name, rows)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._forget_key_norms()  # the keys were copied in place
        self.__dict__.pop("_gate_lookup", None)


def _exact_nearest(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest key by the exact distance to every key (ties to the lower index)."""
    distances = torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist")
    distance, index = distances.min(dim=-1)
    return index, distance


def corrupt_codebook_error(module: str, problem: str) -> CodebookContentError:
    """The error for a saved codebook of ``module`` that :func:`saved_codebook_problem` finds ``problem`` in."""
    return CodebookContentError(
        f"The GRACE codebook saved for module '{module}' is corrupt: {problem}. The adapter file is damaged or was not "
        "written by grace_peft; load a good copy (nothing was changed)."
    )


def saved_codebook_problem(saved: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the tensors of a saved codebook (``keys``, ``radii``, ... by name; ``None`` when nothing
    is). Checked before a codebook loads them, and by :mod:`grace_peft.adapter_files`. Tensors named
    ``journal_*`` are the codebook's journal's (:func:`grace_peft.journal.saved_journal_problem`)."""
    journal = {name.removeprefix(JOURNAL_PREFIX): tensor for name, tensor in saved.items()
               if name.startswith(JOURNAL_PREFIX)}
    saved = {name: tensor for name, tensor in saved.items() if not name.startswith(JOURNAL_PREFIX)}
    problem = _codebook_tensors_problem(saved)
    if problem is not None or not journal:
        return problem
    widths = {name: saved[name].shape[-1] for name in ("keys", "values") if name in saved and saved[name].dim() == 2}
    return saved_journal_problem(journal, widths.get("keys"), widths.get("values"))


def _codebook_tensors_problem(saved: dict[str, torch.Tensor]) -> str | None:
    for name, tensor in saved.items():
        floating = name in _FLOAT_TENSORS
        if floating and not tensor.is_floating_point():
            return f"its '{name}' has dtype {tensor.dtype}, not a floating dtype"
        if not floating and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
            return f"its '{name}' has dtype {tensor.dtype}, not an integer dtype"
        if floating and not bool(torch.isfinite(tensor).all()):
            return f"its '{name}' holds NaN or infinite numbers"
    rows = {name: saved[name].shape[0] for name in _ROW_TENSORS if name in saved and name != "label_tokens"}
    if len(set(rows.values())) > 1:
        return f"its tensors disagree on the number of entries ({rows})"
    if "radii" in saved and bool((saved["radii"] < 0).any()):
        return "its 'radii' holds negative radii"
    if "label_lengths" in saved:
        lengths = saved["label_lengths"]
        if bool((lengths < 1).any()):
            return "its 'label_lengths' holds an entry without label tokens"
        if "label_tokens" in saved and int(lengths.sum()) != saved["label_tokens"].shape[0]:
            return (f"its 'label_lengths' add up to {int(lengths.sum())} label tokens, but 'label_tokens' holds "
                    f"{saved['label_tokens'].shape[0]}")
    if "gate_lengths" in saved or "gate_owners" in saved:
        lengths, owners = saved.get("gate_lengths"), saved.get("gate_owners")
        if lengths is None or owners is None or lengths.shape != owners.shape:
            return "its gate tensors do not hang together ('gate_lengths' and 'gate_owners' differ)"
        if bool((lengths < 1).any()) or ("gate_tokens" in saved and int(lengths.sum()) != len(saved["gate_tokens"])):
            return "its 'gate_lengths' do not add up to its 'gate_tokens'"
        entries = saved["keys"].shape[0] if "keys" in saved else None
        if owners.numel() and (int(owners.min()) < 0 or (entries is not None and int(owners.max()) >= entries)):
            return "its 'gate_owners' name an entry it does not have"
    if "edit_ids" in saved:
        ids = saved["edit_ids"]
        if ids.numel() != torch.unique(ids).numel():
            return "its 'edit_ids' repeat an id (each entry is created by its own edit)"
        if ids.numel() and int(ids.min()) < 0:
            return "its 'edit_ids' hold a negative id"
        if "next_edit_id" in saved and ids.numel() and int(ids.max()) >= int(saved["next_edit_id"]):
            return (f"its 'edit_ids' hold id {int(ids.max())}, not below its 'next_edit_id' "
                    f"{int(saved['next_edit_id'])}")
    return None
