"""What is in a GRACE adapter and why the model answers as it does.

* :func:`edit_history`: the edits an adapter holds, from its codebooks' journals (what ``grace-peft list`` prints);
* :func:`explain`: for one prompt, each wrapped module's nearest entries, their distances and radii, and which one
  fired (what ``grace-peft trace`` prints);
* :func:`fired_edits`: during generation (or any forward), which edit fired for each row.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .codebook import Codebook
from .inputs import (
    Task,
    detect_task,
    encode_prompt,
    input_device,
    is_encoder_decoder,
    pad_token_id,
    transformers_model,
)
from .journal import UNKNOWN
from .model import grace_layers

__all__ = ["FiredEdits", "HistoryEdit", "ModuleTrace", "Neighbour", "Trace", "edit_history", "explain",
           "fired_edits", "greedy_answer"]


# ---------------------------------------------------------------------------------------------- history
@dataclass
class HistoryEdit:
    """One edit in an adapter's journal, over all wrapped modules: per module the ``operations`` (add / expand /
    split / overwrite), the ``entries`` it created or trained and their current ``radii`` (``None`` once the entry
    has left); the target's token ids (``target`` decoded when a tokenizer is given); ``prompt`` and
    ``target_text`` only when the journal kept the text (``GraceConfig.journal_text``). ``success`` and ``steps``
    are ``None`` when not recorded (an edit replayed by a merge)."""

    edit_id: int
    operations: dict[str, str]
    entries: dict[str, int]
    radii: dict[str, float | None]
    target_tokens: list[int]
    target: str | None = None
    prompt: str | None = None
    target_text: str | None = None
    steps: int | None = None
    success: bool | None = None
    seconds: float | None = None
    time: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def edit_history(codebooks: Mapping[str, Codebook], tokenizer=None) -> list[HistoryEdit]:
    """The edits recorded in the journals of ``codebooks`` (by module name), oldest first."""
    edits: dict[int, HistoryEdit] = {}
    for module, codebook in codebooks.items():
        for record in codebook.journal.records():
            edit = edits.get(record.edit_id)
            if edit is None:
                text = record.text or {}
                edit = edits[record.edit_id] = HistoryEdit(
                    edit_id=record.edit_id, operations={}, entries={}, radii={},
                    target_tokens=record.target.tolist(),
                    target=tokenizer.decode(record.target.tolist()) if tokenizer is not None else None,
                    prompt=text.get("prompt"), target_text=None if "target" not in text else str(text["target"]),
                    steps=None if record.steps == UNKNOWN else record.steps,
                    success=None if record.success == UNKNOWN else bool(record.success),
                    seconds=None if record.seconds < 0 else record.seconds,
                    time=datetime.datetime.fromtimestamp(record.time_ns / 1e9, datetime.timezone.utc)
                    .isoformat(timespec="seconds"),
                )
            edit.operations[module] = record.operation
            edit.entries[module] = record.entry
            edit.radii[module] = float(codebook.radii[record.entry]) if record.entry >= 0 else None
    return [edits[edit_id] for edit_id in sorted(edits)]


# ---------------------------------------------------------------------------------------------- explain
@dataclass(frozen=True)
class Neighbour:
    """A codebook entry near a prompt's key: its ``entry`` index, the ``edit_id`` that made it, the exact
    ``distance`` from the key and the entry's ``radius``, its label (token ids, ``target`` decoded) and whether it
    ``fired`` (the nearest entry, within its radius: the layer's output was replaced by its value)."""

    entry: int
    edit_id: int
    distance: float
    radius: float
    label: list[int]
    target: str | None
    fired: bool
    gated_out: bool = False  # the entry's subject gate is closed for this prompt (GraceConfig.subject_gate)

    def describe(self) -> str:
        target = f"{self.target!r}, " if self.target is not None else ""
        relation = "<=" if self.distance <= self.radius else ">"
        gate = ", its subject is not in the prompt" if self.gated_out else ""
        return f"edit {self.edit_id} ({target}distance {self.distance:.4g} {relation} radius {self.radius:.4g}{gate})"


@dataclass
class ModuleTrace:
    """The nearest entries of one wrapped module's codebook for a prompt's key, nearest first."""

    module: str
    neighbours: list[Neighbour] = field(default_factory=list)

    @property
    def fired(self) -> Neighbour | None:
        return next((neighbour for neighbour in self.neighbours if neighbour.fired), None)

    def summary(self) -> str:
        if self.fired is not None:
            return f"{self.module}: {self.fired.describe().replace(' (', ' fired (', 1)}"
        if not self.neighbours:
            return f"{self.module}: no edit fired (the codebook is empty)"
        return f"{self.module}: no edit fired (nearest: {self.neighbours[0].describe()})"


@dataclass
class Trace:
    """Why the model answers ``prompt`` as it does: per wrapped module, the nearest entries and the one that fired."""

    prompt: str
    modules: list[ModuleTrace]

    @property
    def fired(self) -> list[Neighbour]:
        """The entries that fired, over all modules."""
        return [module.fired for module in self.modules if module.fired is not None]

    def summary(self) -> str:
        return "\n".join(module.summary() for module in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt,
                "modules": [{"module": module.module, "fired": module.fired is not None,
                             "neighbours": [asdict(neighbour) for neighbour in module.neighbours]}
                            for module in self.modules]}


@torch.no_grad()
def explain(model: nn.Module, tokenizer, prompt: str, *, adapter_name: str = "default", task: Task | None = None,
            chat: bool = False, neighbours: int = 3) -> Trace:
    """Run ``prompt`` through the model as inference does and report, for every module that holds
    ``adapter_name``, the ``neighbours`` nearest entries to the prompt's key and which one fired."""
    layers = grace_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"No GRACE adapter named '{adapter_name}' in this model.")
    task = task or detect_task(model)
    inputs = encode_prompt(tokenizer, task, prompt, chat=chat)
    if is_encoder_decoder(transformers_model(model)):
        start = transformers_model(model).config.decoder_start_token_id
        inputs["decoder_input_ids"] = torch.tensor([[start]])
    device = input_device(model)
    state = next(iter(layers.values())).call_state
    with state.recording_queries() as recorded:
        model(**{name: tensor.to(device) for name, tensor in inputs.items()})
    traces = []
    for name, layer in layers.items():
        probe = recorded.get((layer, adapter_name))
        if probe is None:
            raise RuntimeError(f"GRACE module '{name}' did not run for this prompt; is adapter '{adapter_name}' "
                               "active (model.set_adapter)?")
        codebook = layer.grace_codebook[adapter_name]
        key = probe[0][0]
        gates = codebook.gate_mask([inputs["input_ids"][0].tolist()])
        allowed = None if gates is None else gates[0]
        hit = int(codebook.lookup(key, allowed)[0]) if len(codebook) else -1
        indices, distances = codebook.neighbours(key, neighbours)
        traces.append(ModuleTrace(name, [
            Neighbour(entry=index, edit_id=int(codebook.edit_ids[index]), distance=float(distance),
                      radius=float(codebook.radii[index]), label=codebook.label(index).tolist(),
                      target=tokenizer.decode(codebook.label(index).tolist()) if task is not
                      Task.SEQUENCE_CLASSIFICATION else None, fired=index == hit,
                      gated_out=allowed is not None and not bool(allowed[index]))
            for index, distance in zip(indices.tolist(), distances.tolist(), strict=True)]))
    return Trace(prompt, traces)


# ---------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def greedy_answer(model: nn.Module, tokenizer, prompt: str, *, task: Task, chat: bool = False,
                  max_new_tokens: int = 20) -> str:
    """The model's greedy answer to ``prompt`` (a causal or seq2seq LM), tokenized as an edit's prompt is."""
    inputs = {name: tensor.to(input_device(model))
              for name, tensor in encode_prompt(tokenizer, task, prompt, chat=chat).items()}
    output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=pad_token_id(tokenizer))
    # causal LMs return prompt + new tokens; seq2seq the decoder start token + new tokens
    start = inputs["input_ids"].shape[1] if task is Task.CAUSAL_LM else 1
    return tokenizer.decode(output[0, start:].tolist(), skip_special_tokens=True)


@dataclass
class FiredEdits:
    """Filled by :func:`fired_edits`: ``rows[i]`` maps each wrapped module to the edit id that fired for row ``i``
    of the latest forward that searched the codebooks (a generation's prefill; beams count as rows), or ``None``."""

    rows: list[dict[str, int | None]] = field(default_factory=list)

    @property
    def edit_ids(self) -> list[int | None]:
        """Per row, the edit that fired (the first module's, in module order), or ``None``."""
        return [next((edit for edit in row.values() if edit is not None), None) for row in self.rows]


@contextmanager
def fired_edits(model: nn.Module, adapter_name: str = "default") -> Iterator[FiredEdits]:
    """``with fired_edits(model) as fired: model.generate(...)``, then ``fired.edit_ids[i]``: which edit fired for
    row ``i`` (``None``: the layer answered unchanged)."""
    layers = grace_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"No GRACE adapter named '{adapter_name}' in this model.")
    names = {layer: name for name, layer in layers.items()}
    fired = FiredEdits()

    def note(layer, adapter: str, hits: torch.Tensor) -> None:
        if adapter != adapter_name or layer not in names:
            return
        codebook = layer.grace_codebook[adapter]
        ids = [int(codebook.edit_ids[hit]) if hit >= 0 else None for hit in hits.tolist()]
        if not fired.rows or len(fired.rows) != len(ids) or names[layer] in fired.rows[0]:
            fired.rows = [{} for _ in ids]  # a new forward
        for row, edit_id in zip(fired.rows, ids, strict=True):
            row[names[layer]] = edit_id

    state = next(iter(layers.values())).call_state
    with state.watching_hits(note):
        yield fired
