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
from safetensors.torch import load_file

from .codebook import saved_codebook_problem
from .model import PEFT_WRAPPER_PREFIX
from .registration import GRACE_PEFT_TYPE
from .saving import config_saved_with_weights

_CODEBOOK_TENSOR = re.compile(
    rf"^(?:{re.escape(PEFT_WRAPPER_PREFIX)})?(?P<module>.+)\.grace_codebook\.(?P<tensor>\w+)$")
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
        "radii": {"min": min(radii, default=None), "median": statistics.median(radii) if radii else None,
                  "max": max(radii, default=None)},
        "value_norms": {"min": min(norms, default=None), "max": max(norms, default=None)},
    }
