"""A saved GRACE adapter read from its files alone, without a model: its config, its codebook tensors per module,
and a summary of them (what ``grace-peft inspect`` prints)."""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .codebook import Codebook, CodebookContentError, CodebookShapeError, saved_codebook_problem
from .inputs import Task
from .journal import DEFAULT_LIMIT
from .model import PEFT_WRAPPER_PREFIX
from .registration import GRACE_PEFT_TYPE
from .saving import CARD, SAVE_ID, config_saved_with_weights, save_as_one_unit

_TASKS = {"CAUSAL_LM": Task.CAUSAL_LM, "SEQ_2_SEQ_LM": Task.SEQ2SEQ_LM, "SEQ_CLS": Task.SEQUENCE_CLASSIFICATION}

_CODEBOOK_TENSOR = re.compile(
    rf"^(?P<prefix>(?:{re.escape(PEFT_WRAPPER_PREFIX)})?(?P<module>.+)\.grace_codebook\.)"
    rf"(?P<tensor>\w+)$")
_NEEDED_TENSORS = ("keys", "values", "radii", "edit_ids")


class AdapterFileError(ValueError):
    """A folder that is not a readable GRACE adapter (the message says which file and what is wrong)."""


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a GRACE adapter folder (or, when it comes from another save than the
    weights file, the config the weights were saved with)."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise AdapterFileError(f"adapter folder not found: {folder}")
    if not path.is_file():
        raise AdapterFileError(f"{folder} is not a GRACE adapter: it has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise AdapterFileError(f"{path} is not valid JSON: {error}") from None
    try:
        config = config_saved_with_weights(folder) or config  # a save interrupted between its two files
    except ValueError as error:
        raise AdapterFileError(str(error)) from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != GRACE_PEFT_TYPE.value:
        raise AdapterFileError(f"{folder} is not a GRACE adapter: its {CONFIG_NAME} has peft_type {peft_type!r}")
    return config


def read_codebooks(folder: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The saved codebook tensors (``keys``, ``values``, ``radii``, ...) per wrapped module name."""
    weights = Path(folder) / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFileError(f"{folder} has a GRACE {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME}")
    try:
        saved = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(f"{weights} cannot be read: {error}") from None
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in saved.items():
        if match := _CODEBOOK_TENSOR.match(key):
            tensors.setdefault(match["module"], {})[match["tensor"]] = tensor
    if not tensors:
        raise AdapterFileError(f"{weights} holds no GRACE codebook tensors")
    for module, parts in tensors.items():
        missing = [name for name in _NEEDED_TENSORS if name not in parts]
        if missing:
            raise AdapterFileError(f"{weights}: the codebook of {module} lacks its {', '.join(missing)} tensor(s)")
        problem = saved_codebook_problem(parts)
        if problem is not None:
            raise AdapterFileError(f"{weights}: the codebook of {module} is corrupt: {problem}")
    return tensors


def saved_codebooks(folder: str | os.PathLike) -> dict[str, Codebook]:
    """The saved codebooks of a GRACE adapter as live :class:`Codebook` objects (with their journals), per wrapped
    module, built from the files alone: to list, take back or merge edits without loading a model."""
    config = read_adapter_config(folder)
    codebooks = {}
    for module, parts in read_codebooks(folder).items():
        codebook = Codebook(parts["keys"].shape[-1], parts["values"].shape[-1],
                            eps_init=config.get("eps_init", 1.0), expand_rule=config.get("eps_expand", "coverage"),
                            split_rule=config.get("eps_split", "halve"), key_center="key_center" in parts,
                            journal_limit=config.get("journal_limit", DEFAULT_LIMIT))
        try:
            codebook.load_state_dict(parts)
        except (CodebookShapeError, CodebookContentError, RuntimeError) as error:
            raise AdapterFileError(f"{folder}: the codebook of {module} cannot be read: {error}") from None
        codebooks[module] = codebook
    return codebooks


def write_adapter(source: str | os.PathLike, codebooks: dict[str, Codebook], output: str | os.PathLike,
                  config_changes: dict[str, Any] | None = None) -> None:
    """Save ``codebooks`` (by module name) as a GRACE adapter at ``output``: ``source``'s adapter with each
    module's codebook replaced, its config updated (recorded codebook sizes, ``config_changes``) and the GRACE
    model card, written as one unit (:func:`grace_peft.saving.save_as_one_unit`). ``output`` may be ``source``."""
    from .config import GraceConfig
    from .hub import card_for

    config = read_adapter_config(source)
    weights = load_file(Path(source) / SAFETENSORS_WEIGHTS_NAME)
    prefixes = {match["module"]: match["prefix"] for key in weights if (match := _CODEBOOK_TENSOR.match(key))}
    missing = sorted(set(codebooks) - set(prefixes))
    if missing:
        raise AdapterFileError(f"{source} has no codebook for {', '.join(missing)}")
    kept = {key: tensor for key, tensor in weights.items()
            if not ((match := _CODEBOOK_TENSOR.match(key)) and match["module"] in codebooks)}
    for module, codebook in codebooks.items():
        kept.update({prefixes[module] + name: tensor.detach().contiguous().cpu()
                     for name, tensor in codebook.state_dict().items()})
    config = {**config, **(config_changes or {})}
    config["codebook_sizes"] = {**config.get("codebook_sizes", {}),
                                **{module: codebook.shape_record() for module, codebook in codebooks.items()}}
    config.pop(SAVE_ID, None)
    grace_config = GraceConfig.from_peft_type(**config)

    def write(folder: str) -> None:
        save_file(kept, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2, sort_keys=True)
        with open(os.path.join(folder, CARD), "w", encoding="utf-8") as file:
            file.write(card_for(grace_config, codebooks, _TASKS.get(config.get("task_type"))))

    save_as_one_unit(output, write)


def summarize_adapter(folder: str | os.PathLike) -> dict[str, Any]:
    """Configuration essentials and per-module codebook statistics of a saved GRACE adapter."""
    config = read_adapter_config(folder)
    modules = {name: codebook_statistics(parts) for name, parts in sorted(read_codebooks(folder).items())}
    target_modules = config.get("target_modules")
    return {
        "adapter": os.fspath(folder),
        "config": {
            "base_model": config.get("base_model_name_or_path"),
            "target_modules": sorted(target_modules) if isinstance(target_modules, list) else target_modules,
            "eps_init": config.get("eps_init"),
            "eps_expand": config.get("eps_expand"),
            "replacement": config.get("replacement"),
        },
        "num_keys": sum(module["keys"] for module in modules.values()),
        "modules": modules,
    }


def codebook_statistics(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keys, radii, distinct edit ids and value norms of one saved codebook."""
    keys, values, radii = tensors["keys"], tensors["values"].float(), tensors["radii"].float().tolist()
    norms = values.norm(dim=-1).tolist()
    next_edit_id = tensors.get("next_edit_id")
    return {
        "keys": keys.shape[0],
        "key_dim": keys.shape[-1],
        "value_dim": values.shape[-1],
        "distinct_edit_ids": len(set(tensors["edit_ids"].tolist())),
        "edits_seen": int(next_edit_id) if next_edit_id is not None else None,
        "journal_records": tensors["journal_fields"].shape[0] if "journal_fields" in tensors else 0,
        "gated_entries": len(set(tensors["gate_owners"].tolist())) if "gate_owners" in tensors else 0,
        "radii": {"min": min(radii, default=None), "median": statistics.median(radii) if radii else None,
                  "max": max(radii, default=None)},
        "value_norms": {"min": min(norms, default=None), "max": max(norms, default=None)},
    }
