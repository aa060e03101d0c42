"""The edit journal of one codebook: what each edit did to it, enough to list the edits, trace them and take one back.

Like :mod:`grace_peft.codebook`, this module knows nothing about PEFT. A :class:`Codebook` writes one
:class:`JournalRecord` per edit that reaches it (:meth:`Codebook.update`): the operation, the entry it created or
trained, the entry whose radius, key, value or label it changed with the state before and after, and the edit's
target tokens; the editor adds the outcome (steps, success, seconds, loss) and, when the user keeps it, the text.

Stored as buffers of the codebook (``journal_fields``, ...), so the journal travels with it through every save and
load route (safetensors, the Hub, ``low_cpu_mem_usage``, transformers' ``load_adapter``). Scalars are packed into two
tables (``fields``: int64 columns, ``numbers``: float32 columns, named by :data:`FIELDS` and :data:`NUMBERS`);
token ids and text are ragged (their lengths are columns of ``fields``); before/after states of values and keys are
kept only for the records that changed one (``value_row`` / ``key_row`` point into ``values`` / ``keys``, ``-1`` for
none). Size: about 140 bytes plus 8 per target token per record, and ``2 x 4 x value_dim`` more for a record that
changed a value (EXPAND, OVERWRITE), ``2 x 4 x key_dim`` for one that moved a key (EXPAND by moving average).
A journal keeps at most ``limit`` records; when it is full, the oldest tenth is dropped (those edits stay in the
codebook but can no longer be undone). ``limit=0`` keeps none.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

FIELDS = ("edit_id", "operation", "entry", "changed", "nearest", "edit_id_before", "value_row", "key_row",
          "target_length", "label_before_length", "text_length", "steps", "success", "time_ns")
NUMBERS = ("distance", "radius_before", "radius_after", "seconds", "loss")
OPERATIONS = ("add", "expand", "split", "overwrite")  # stored by position
UNKNOWN = -1  # success and steps of an edit whose outcome is not recorded (yet)
NONE = -1.0  # radius, seconds and loss that do not apply or are not recorded (all are >= 0 otherwise; no NaN, so
# that journals compare equal with torch.equal)
DEFAULT_LIMIT = 100_000

TABLES = ("fields", "numbers", "target_tokens", "label_tokens_before", "text", "values", "keys")
PREFIX = "journal_"  # of the tables' names among the codebook's buffers
_INT_TABLES = ("fields", "target_tokens", "label_tokens_before", "text")


@dataclass
class JournalRecord:
    """What one edit did to one codebook.

    ``entry`` is the entry the edit created (ADD, SPLIT) or trained (EXPAND, OVERWRITE); ``changed`` the existing
    entry whose state it changed (EXPAND, OVERWRITE: ``entry`` itself; SPLIT with halving: the nearest key, whose
    radius shrank), or -1. ``radius_before``/``radius_after``, ``value_before``/``value_after``,
    ``key_before``/``key_after``, ``label_before`` and ``edit_id_before`` describe ``changed`` (None or -1 where
    the edit left that part alone). ``nearest``/``distance``: the nearest key before the edit (-1 / inf for an
    empty codebook).
    """

    edit_id: int
    operation: str
    entry: int
    target: torch.Tensor
    changed: int = -1
    nearest: int = -1
    distance: float = float("inf")
    radius_before: float = NONE
    radius_after: float = NONE
    value_before: torch.Tensor | None = None
    value_after: torch.Tensor | None = None
    key_before: torch.Tensor | None = None
    key_after: torch.Tensor | None = None
    label_before: torch.Tensor | None = None
    edit_id_before: int = -1
    steps: int = UNKNOWN
    success: int = UNKNOWN
    seconds: float = NONE
    loss: float = NONE
    time_ns: int = field(default_factory=time.time_ns)
    text: dict[str, Any] | None = None

    @property
    def created(self) -> bool:
        """Whether the edit created ``entry`` (rather than changing an existing one)."""
        return self.operation in ("add", "split")

    def touches(self, index: int) -> bool:
        """Whether this record created or changed entry ``index``."""
        return index in (self.entry, self.changed)


class EditJournal:
    """The records of one codebook's edits, oldest first (see the module docstring). Its tables are buffers of the
    codebook that owns it, named ``journal_<table>`` (:data:`TABLES`), so that they are saved, loaded and moved with
    the codebook's own tensors."""

    def __init__(self, owner: nn.Module, key_dim: int, value_dim: int, *, limit: int = DEFAULT_LIMIT,
                 shape: dict[str, int] | None = None, device: torch.device | str | None = None) -> None:
        if limit < 0:
            raise ValueError(f"A journal's limit is a number of records >= 0 (0: keep none); got {limit}.")
        self._owner, self.key_dim, self.value_dim, self.limit = owner, key_dim, value_dim, limit
        for name, table in empty_tables(key_dim, value_dim, shape, device).items():
            owner.register_buffer(PREFIX + name, table)

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in TABLES:
            return getattr(self._owner, PREFIX + name)
        raise AttributeError(name)

    def _set(self, name: str, table: torch.Tensor) -> None:
        setattr(self._owner, PREFIX + name, table)

    def __len__(self) -> int:
        return self.fields.shape[0]

    def __repr__(self) -> str:
        return f"EditJournal(records={len(self)}, limit={self.limit})"

    def shape_record(self) -> dict[str, int]:
        """The sizes a fresh journal needs to load this one's state dict (``EditJournal(..., shape=...)``)."""
        return {"records": len(self), "target_tokens": self.target_tokens.shape[0],
                "label_tokens_before": self.label_tokens_before.shape[0], "text": self.text.shape[0],
                "values": self.values.shape[0], "keys": self.keys.shape[0]}

    # ------------------------------------------------------------------------------------------ reading
    def records(self) -> list[JournalRecord]:
        """Every record, oldest first."""
        fields = self.fields.tolist()
        numbers = self.numbers.tolist()
        column = {name: position for position, name in enumerate(FIELDS)}
        spans = {name: _spans([row[column[length]] for row in fields])
                 for name, length in (("target", "target_length"), ("label", "label_before_length"),
                                      ("text", "text_length"))}
        text = bytes(self.text.tolist())
        out = []
        for index, (row, floats) in enumerate(zip(fields, numbers, strict=True)):
            values = dict(zip(FIELDS, row, strict=True))
            start, end = spans["target"][index]
            label_start, label_end = spans["label"][index]
            text_start, text_end = spans["text"][index]
            value_row, key_row = values["value_row"], values["key_row"]
            out.append(JournalRecord(
                edit_id=values["edit_id"], operation=OPERATIONS[values["operation"]], entry=values["entry"],
                target=self.target_tokens[start:end].clone(), changed=values["changed"], nearest=values["nearest"],
                **dict(zip(NUMBERS, floats, strict=True)),
                value_before=self.values[value_row, 0].clone() if value_row >= 0 else None,
                value_after=self.values[value_row, 1].clone() if value_row >= 0 else None,
                key_before=self.keys[key_row, 0].clone() if key_row >= 0 else None,
                key_after=self.keys[key_row, 1].clone() if key_row >= 0 else None,
                label_before=self.label_tokens_before[label_start:label_end].clone()
                if label_end > label_start else None,
                edit_id_before=values["edit_id_before"], steps=values["steps"], success=values["success"],
                time_ns=values["time_ns"],
                text=json.loads(text[text_start:text_end].decode("utf-8")) if text_end > text_start else None,
            ))
        return out

    def edit_ids(self) -> set[int]:
        """The ids of the edits recorded."""
        return set(self.fields[:, 0].tolist())

    def positions_of(self, edit_id: int) -> list[int]:
        """Positions of the records of edit ``edit_id`` (at most one per codebook, unless edited by hand)."""
        return (self.fields[:, 0] == edit_id).nonzero().flatten().tolist()

    # ------------------------------------------------------------------------------------------ writing
    @torch.no_grad()
    def append(self, record: JournalRecord) -> None:
        """Add a record (when the journal is full, its oldest tenth goes first: a full journal is not rewritten on
        every edit)."""
        if self.limit == 0:
            return
        if len(self) >= self.limit:
            self.write(self.records()[len(self) - self.limit + max(1, self.limit // 10):] + [record])
            return
        device = self.fields.device
        value_row = key_row = -1
        if record.value_before is not None:
            value_row = self.values.shape[0]
            after = record.value_after if record.value_after is not None else record.value_before
            self._extend("values", self._pair(record.value_before, after, self.value_dim))
        if record.key_before is not None:
            key_row = self.keys.shape[0]
            after = record.key_after if record.key_after is not None else record.key_before
            self._extend("keys", self._pair(record.key_before, after, self.key_dim))
        text = _encode_text(record.text)
        label_before = record.label_before if record.label_before is not None else torch.zeros(0, dtype=torch.int64)
        row = {**{name: getattr(record, name) for name in FIELDS if hasattr(record, name)},
               "operation": OPERATIONS.index(record.operation), "value_row": value_row, "key_row": key_row,
               "target_length": record.target.numel(), "label_before_length": label_before.numel(),
               "text_length": len(text)}
        self._extend("fields", torch.tensor([[int(row[name]) for name in FIELDS]], device=device))
        self._extend("numbers", torch.tensor([[float(getattr(record, name)) for name in NUMBERS]],
                                             dtype=torch.float32, device=device))
        self._extend("target_tokens", record.target.to(device, torch.int64).reshape(-1))
        self._extend("label_tokens_before", label_before.to(device, torch.int64).reshape(-1))
        self._extend("text", torch.tensor(list(text), dtype=torch.uint8, device=device))

    @torch.no_grad()
    def write(self, records: list[JournalRecord]) -> None:
        """Replace every record by ``records`` (oldest first; the oldest beyond ``limit`` are dropped)."""
        scratch = EditJournal(nn.Module(), self.key_dim, self.value_dim, limit=self.limit, device=self.fields.device)
        for record in records[max(0, len(records) - self.limit):]:
            scratch.append(record)
        for name in TABLES:
            self._set(name, getattr(scratch, name))

    @torch.no_grad()
    def set_outcome(self, edit_id: int, *, steps: int, success: bool, seconds: float, loss: float) -> None:
        """Record how edit ``edit_id`` ended."""
        positions = self.positions_of(edit_id)
        column = {name: FIELDS.index(name) for name in ("steps", "success")}
        for position in positions:
            self.fields[position, column["steps"]] = steps
            self.fields[position, column["success"]] = int(success)
            self.numbers[position, NUMBERS.index("seconds")] = seconds
            self.numbers[position, NUMBERS.index("loss")] = loss if math.isfinite(loss) else NONE

    @torch.no_grad()
    def note_value(self, index: int, value: torch.Tensor) -> None:
        """Entry ``index`` got ``value``: it is the after-state of the latest record that changed that value."""
        value_column, changed_column = FIELDS.index("value_row"), FIELDS.index("changed")
        rows = ((self.fields[:, changed_column] == index) & (self.fields[:, value_column] >= 0)).nonzero()
        if len(rows):
            self.values[int(self.fields[int(rows[-1]), value_column]), 1] = value.to(self.values)

    @torch.no_grad()
    def entry_removed(self, index: int) -> None:
        """Entry ``index`` left the codebook: later entries moved down by one, and records that pointed at it now
        point nowhere (-1)."""
        for name in ("entry", "changed", "nearest"):
            column = self.fields[:, FIELDS.index(name)]
            column[column == index] = -1
            column[column > index] -= 1

    def _pair(self, before: torch.Tensor, after: torch.Tensor, width: int) -> torch.Tensor:
        pair = torch.stack([before.reshape(width), after.reshape(width)]).to(self.fields.device, torch.float32)
        return pair.unsqueeze(0)

    def _extend(self, name: str, rows: torch.Tensor) -> None:
        self._set(name, torch.cat([getattr(self, name), rows]))


def empty_tables(key_dim: int, value_dim: int, shape: dict[str, int] | None = None,
                 device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A journal's tables, empty or (``shape``: :meth:`EditJournal.shape_record`) sized to load a saved one."""
    shape = shape or {}
    records = shape.get("records", 0)
    return {
        "fields": torch.zeros(records, len(FIELDS), dtype=torch.int64, device=device),
        "numbers": torch.zeros(records, len(NUMBERS), dtype=torch.float32, device=device),
        "target_tokens": torch.zeros(shape.get("target_tokens", 0), dtype=torch.int64, device=device),
        "label_tokens_before": torch.zeros(shape.get("label_tokens_before", 0), dtype=torch.int64, device=device),
        "text": torch.zeros(shape.get("text", 0), dtype=torch.uint8, device=device),
        "values": torch.zeros(shape.get("values", 0), 2, value_dim, dtype=torch.float32, device=device),
        "keys": torch.zeros(shape.get("keys", 0), 2, key_dim, dtype=torch.float32, device=device),
    }


def prepare_journal_load(journal: EditJournal, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Make ``state_dict`` (a codebook's, under ``prefix``) loadable into ``journal``'s tables: a journal grows like
    its codebook, so each table first takes the saved size and the saved tensor the table's dtype; a codebook saved
    before journals existed has none, and gets empty tables (so that nothing is reported missing)."""
    saved = {name: state_dict.get(prefix + PREFIX + name) for name in TABLES}
    if all(tensor is None for tensor in saved.values()):
        device = state_dict[prefix + "keys"].device if prefix + "keys" in state_dict else None
        for name, table in empty_tables(journal.key_dim, journal.value_dim, device=device).items():
            state_dict[prefix + PREFIX + name] = table
        saved = {name: state_dict[prefix + PREFIX + name] for name in TABLES}
    for name, tensor in saved.items():
        if tensor is None:
            continue  # reported missing by torch
        current = getattr(journal, name)
        state_dict[prefix + PREFIX + name] = tensor = tensor.to(current.dtype)
        if tensor.shape != current.shape:
            journal._set(name, torch.zeros(tensor.shape, dtype=current.dtype, device=current.device))


def saved_journal_problem(saved: dict[str, torch.Tensor], key_dim: int | None = None,
                          value_dim: int | None = None) -> str | None:
    """What is wrong with the tables of a saved journal (by table name, without :data:`PREFIX`; None when nothing
    is)."""
    for name, tensor in saved.items():
        if name not in TABLES:
            return f"its journal holds an unknown tensor '{name}'"
        if (name in _INT_TABLES) == tensor.is_floating_point():
            return f"its journal's '{name}' has dtype {tensor.dtype}"
        if tensor.is_floating_point() and bool((tensor.isnan() if name == "numbers" else ~tensor.isfinite()).any()):
            return f"its journal's '{name}' holds NaN or infinite numbers"
    fields, numbers = saved.get("fields"), saved.get("numbers")
    if fields is None or numbers is None:
        return "its journal lacks its 'fields' or 'numbers' table" if saved else None
    if fields.dim() != 2 or fields.shape[1] != len(FIELDS) or numbers.shape != (fields.shape[0], len(NUMBERS)):
        return f"its journal's tables have shapes {tuple(fields.shape)} and {tuple(numbers.shape)}"
    for name, length, buffer in (("target_tokens", "target_length", "target_tokens"),
                                 ("label_tokens_before", "label_before_length", "label_tokens_before"),
                                 ("text", "text_length", "text")):
        total = int(fields[:, FIELDS.index(length)].sum()) if len(fields) else 0
        held = saved[buffer].shape[0] if buffer in saved else 0
        if total != held:
            return f"its journal's lengths add up to {total} {name}, but '{buffer}' holds {held}"
    operations = fields[:, FIELDS.index("operation")]
    if len(fields) and (int(operations.min()) < 0 or int(operations.max()) >= len(OPERATIONS)):
        return "its journal names an unknown operation"
    for name, buffer, width in (("value_row", "values", value_dim), ("key_row", "keys", key_dim)):
        rows = fields[:, FIELDS.index(name)]
        held = saved[buffer].shape[0] if buffer in saved else 0
        if len(fields) and int(rows.max()) >= held:
            return f"its journal points at row {int(rows.max())} of '{buffer}', which holds {held}"
        if buffer in saved and width is not None and tuple(saved[buffer].shape[1:]) != (2, width):
            return f"its journal's '{buffer}' has shape {tuple(saved[buffer].shape)}, not (n, 2, {width})"
    return None


def _spans(lengths: list[int]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for length in lengths:
        spans.append((start, start + length))
        start += length
    return spans


def _encode_text(text: dict[str, Any] | None) -> bytes:
    return b"" if text is None else json.dumps(text, ensure_ascii=False, sort_keys=True).encode("utf-8")
