"""Base models by name: load a checkpoint folder (or ``"smollm2"``) and find the module GRACE edits in block N.

Shared by the ``grace-peft`` CLI, the demo and the benchmarks, so that all of them resolve a model and its edited
layer the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inputs import is_encoder_decoder

SMOLLM2 = "smollm2"
# Chosen by measurement on SmolLM2-135M (README: "Choosing the layer and the radius"): the paper's key at block 27,
# radius 8, values trained by the line search. No unrelated prompt changes (zsRE, CounterFact, the demo's prompts
# that share an edit's wording), but rewordings of an edit rarely fire it.
SMOLLM2_LAYER = 27
SMOLLM2_EPS_INIT = 8.0
SMOLLM2_OPTIMIZER = "line_search"
# Opt-in (README: "Edits that hold when the question is reworded"): the key is block 3's MLP projection input
# averaged over the prompt (cosine), radius 0.85, SPLIT keeps radii. Rewordings fire their edit (zsRE Gen .84
# instead of .23, Loc 1.000), and so can prompts that share an edit's wording with another subject (CounterFact Loc
# .78): for edits whose neighbours are not themselves facts the model must keep.
SMOLLM2_KEY_LAYER = 3
SMOLLM2_REWORDING_SETTINGS = {"key": "prompt_mean", "eps_split": "keep", "eps_init": 0.85, "subject_gate": True}

# MLP output projection of block N, per model family, matched against the full module names.
MLP_OUTPUT_PATTERNS = {
    "llama": re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$"),  # Llama, Mistral, Qwen2, SmolLM2, ...
    "gpt2": re.compile(r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$"),  # GPT-2 (Conv1D), GPT-Neo
}


class ModelLoadError(ValueError):
    """A model name or folder that cannot be loaded, or a model whose edited layer cannot be found by name."""


def model_folder(model: str) -> Path:
    """The checkpoint folder of ``model``: a local folder, or ``"smollm2"`` for SmolLM2's converted checkpoint."""
    if model == SMOLLM2:
        from .smollm2 import smollm2_path

        try:
            return smollm2_path()
        except ModuleNotFoundError as error:
            raise ModelLoadError(str(error)) from None
    folder = Path(model)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {model}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{model} is not a transformers model folder (no config.json)")
    return folder


def load_model(model: str, dtype: str | torch.dtype = "float32") -> tuple[nn.Module, Any]:
    """The base model (causal or seq2seq LM, by its config) in eval mode, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = model_folder(model)
    try:
        config = AutoConfig.from_pretrained(folder)
        auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
        base = auto_class.from_pretrained(folder, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the model in {model}: {error}") from None
    return base.eval(), tokenizer


def smollm2_settings(model: nn.Module, layer: int | None = None, *, rewording: bool = False) -> dict[str, Any]:
    """The measured SmolLM2 settings as GraceConfig fields, for block ``layer`` (default 27) of ``model``; with
    ``rewording``, the opt-in key for edits that must hold when the question is reworded."""
    settings = {"target_modules": [mlp_output_projection(model, layer)], "eps_init": SMOLLM2_EPS_INIT,
                "optimizer": SMOLLM2_OPTIMIZER}
    if rewording:
        settings.update(SMOLLM2_REWORDING_SETTINGS, key_module=mlp_output_projection(model, SMOLLM2_KEY_LAYER))
    return settings


def default_layer(family: str, num_layers: int) -> int:
    """The block edited when none is named: 27 for Llama-like models with at least 28 blocks (SmolLM2-135M has
    30), else the second-to-last block."""
    if family == "llama" and num_layers > SMOLLM2_LAYER:
        return SMOLLM2_LAYER
    return max(num_layers - 2, 0)


def mlp_output_projections(model: nn.Module) -> tuple[str, dict[int, str]]:
    """The model family and, per block index, the full name of the block's MLP output projection."""
    names = [name for name, _ in model.named_modules()]
    for family, pattern in MLP_OUTPUT_PATTERNS.items():
        found = [(int(match.group(1)), name) for name in names if (match := pattern.search(name))]
        blocks = dict(found)
        if found and len(blocks) == len(found) and sorted(blocks) == list(range(len(blocks))):  # one per block
            return family, blocks
    raise ModelLoadError(f"cannot find the MLP output projections of a {type(model).__name__} by name; "
                         "name the module(s) to edit explicitly (target_modules)")


def mlp_output_projection(model: nn.Module, layer: int | None = None) -> str:
    """The full name of block ``layer``'s MLP output projection (default: :func:`default_layer`)."""
    family, projections = mlp_output_projections(model)
    if layer is None:
        layer = default_layer(family, len(projections))
    if layer not in projections:
        raise ModelLoadError(f"layer {layer} is out of range: the model has {len(projections)} blocks "
                             f"(0 to {len(projections) - 1})")
    return projections[layer]
