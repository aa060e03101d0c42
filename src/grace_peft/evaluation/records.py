"""Read model-editing data sets (zsRE, CounterFact, plain JSON Lines) into :class:`EditRecord` lists.

Every file may be a JSON list of objects or one JSON object per line (JSON Lines, read lazily). The format names
which keys hold the five fields of an edit:

* ``zsre``: ``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``;
* ``counterfact``: ``prompt``, ``target_new`` (a string or ``{"str": ...}``), ``rephrase_prompt``,
  ``locality_prompt``, ``locality_ground_truth``;
* ``jsonl``: ``prompt``, ``target``, ``rephrase``, ``locality_prompt``, ``locality_answer``.

Other keys are ignored. Strings are stripped; optional fields that are missing, null or empty become ``None``;
records with an empty target are skipped with one warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

FORMATS = ("zsre", "counterfact", "jsonl")

_ROLES = ("prompt", "target", "rephrase", "locality_prompt", "locality_answer", "subject")
_KEYS = {  # format -> the key holding each role; detection tries the formats in this order
    "zsre": ("src", "alt", "rephrase", "loc", "loc_ans", "subject"),
    "counterfact": ("prompt", "target_new", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "subject"),
    "jsonl": ("prompt", "target", "rephrase", "locality_prompt", "locality_answer", "subject"),
}
_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object",
               type(None): "null"}

_Item = tuple[int | None, object]  # (line number for JSON Lines else None, the parsed record)


class EditFileError(ValueError):
    """An edit file or record that cannot be read; the message names the file, the record and what to fix."""


@dataclass(frozen=True)
class EditRecord:
    """One edit: the prompt and its new target, with optional generalization and locality probes."""

    prompt: str  # the edit prompt
    target: str  # the new answer to teach
    rephrase: str | None = None  # a paraphrase of the prompt (generalization, "Gen")
    locality_prompt: str | None = None  # an unrelated prompt that must not change ("Loc")
    locality_answer: str | None = None  # its answer (the teacher-forced continuation for Loc)
    subject: str | None = None  # what the edit is about, as the prompt spells it (GraceConfig.subject_gate)
    source_index: int = -1  # position of the record in its file (0-based)


def read_edits(path: str | os.PathLike, format: str = "auto", *, limit: int | None = None) -> list[EditRecord]:
    """Read the edits of ``path`` in ``format`` (one of :data:`FORMATS`, or ``"auto"`` to detect it)."""
    _check_format(format)
    return _read(path, format, limit)


def read_zsre(path: str | os.PathLike, *, limit: int | None = None) -> list[EditRecord]:
    """Read a zsRE file (``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``)."""
    return _read(path, "zsre", limit)


def read_counterfact(path: str | os.PathLike, *, limit: int | None = None) -> list[EditRecord]:
    """Read a CounterFact file (``prompt``, ``target_new``, ``rephrase_prompt``, ``locality_*``)."""
    return _read(path, "counterfact", limit)


def read_jsonl(path: str | os.PathLike, *, limit: int | None = None) -> list[EditRecord]:
    """Read plain records (``prompt``, ``target``, optional ``rephrase``, ``locality_prompt``, ``locality_answer``)."""
    return _read(path, "jsonl", limit)


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` ("zsre", "counterfact" or "jsonl"), from the keys of its first record."""
    with closing(_iter_file(_existing(path))) as items:
        return _detect(next(items, None), os.fspath(path))


def records_from_dicts(items: Iterable[dict], format: str, *, source: str = "<memory>",
                       limit: int | None = None) -> list[EditRecord]:
    """Convert parsed records in ``format`` (or ``"auto"``) to edits; ``source`` names them in messages."""
    _check_format(format)
    return _convert(((None, item) for item in items), format, source, limit, stacklevel=3)


def _check_format(format: str) -> None:
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown edit file format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")


def _existing(path: str | os.PathLike) -> Path:
    if not Path(path).exists():
        raise FileNotFoundError(f"edit file not found: {os.fspath(path)}")
    return Path(path)


def _read(path: str | os.PathLike, format: str, limit: int | None) -> list[EditRecord]:
    with closing(_iter_file(_existing(path))) as items:
        return _convert(items, format, os.fspath(path), limit, stacklevel=4)


def _iter_file(path: Path) -> Iterator[_Item]:
    """Yield the records of a JSON list file, or lazily those of a JSON Lines file (blank lines skipped)."""
    with path.open(encoding="utf-8-sig") as file:
        first = file.read(1)
        while first.isspace():
            first = file.read(1)
        file.seek(0)
        if first == "[":
            try:
                data = json.load(file)
            except json.JSONDecodeError as error:
                raise EditFileError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: "
                                    f"{error.msg}") from None
            yield from ((None, item) for item in data)
            return
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise EditFileError(f"{path}: line {number}: invalid JSON at column {error.colno}: {error.msg} "
                                    "(expected a JSON list of records, or one JSON object per line)") from None


def _detect(first: _Item | None, source: str) -> str:
    if first is None:
        raise EditFileError(f"{source}: contains no records, so its format cannot be detected")
    item = first[1]
    if isinstance(item, dict):
        for format, (prompt_key, target_key, *_) in _KEYS.items():
            if prompt_key in item and target_key in item:
                return format
        found = f"has keys {sorted(map(str, item))}"
    else:
        found = f"is a JSON {_json_type(item)}, not an object"
    accepted = "; ".join(f"{name}: {keys[0]!r} and {keys[1]!r}" for name, keys in _KEYS.items())
    raise EditFileError(f"{source}: cannot detect the format: the first record {found}; expected the keys of one "
                        f"of the formats ({accepted})")


def _convert(items: Iterable[_Item], format: str, source: str, limit: int | None, *,
             stacklevel: int) -> list[EditRecord]:
    """Validate and convert ``items``; stop once ``limit`` records are kept; warn once about skipped ones."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    records: list[EditRecord] = []
    if limit == 0:
        return records
    items = iter(items)
    if format == "auto":
        first = next(items, None)
        format = _detect(first, source)
        items = chain([first], items)
    skipped = seen = 0
    for index, (line, item) in enumerate(items):
        seen = index + 1
        values = _values(item, format, _where(source, index, line, item))
        if values["target"] is None:
            skipped += 1
            continue
        records.append(EditRecord(**values, source_index=index))
        if limit is not None and len(records) >= limit:
            break
    if skipped:
        warnings.warn(f"skipped {skipped} of {seen} records in {source} with an empty target "
                      f"({_KEYS[format][1]!r})", UserWarning, stacklevel=stacklevel)
    return records


def _where(source: str, index: int, line: int | None, item: object) -> str:
    details = [f"line {line}"] if line is not None else []
    if isinstance(item, dict) and "case_id" in item:
        details.append(f"case_id {item['case_id']}")
    return f"{source}, record {index}" + (f" ({', '.join(details)})" if details else "")


def _values(item: object, format: str, where: str) -> dict[str, str | None]:
    """The role values of one record: stripped strings, None for an empty optional field or empty target."""
    keys = _KEYS[format]
    if not isinstance(item, dict):
        raise EditFileError(f"{where}: expected a JSON object with keys {keys[0]!r} and {keys[1]!r}, "
                            f"got a JSON {_json_type(item)}")
    values: dict[str, str | None] = {}
    for role, key in zip(_ROLES, keys, strict=True):
        required = role in ("prompt", "target")
        nested = role == "target" and format == "counterfact"
        expected = 'a string or an object {"str": string}' if nested else "a string"
        name = repr(key) if key == role else f"{key!r} ({role})"
        if required and key not in item:
            raise EditFileError(f"{where}: missing required field {name}, which must be {expected}; "
                                f"found keys {sorted(map(str, item))}")
        raw = item.get(key)
        value = raw.get("str") if nested and isinstance(raw, dict) else raw
        if not isinstance(value, str) and (required or value is not None):
            raise EditFileError(f"{where}: field {name} must be {expected}, got a JSON "
                                f"{_json_type(raw)}: {json.dumps(raw, default=repr)[:60]}")
        values[role] = (value or "").strip() or None
        if role == "prompt" and values[role] is None:
            raise EditFileError(f"{where}: field {name} must be a non-empty string, got {value!r}")
    return values


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)
