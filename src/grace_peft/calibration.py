"""Choose a GRACE adapter's radius (and its key center) from unrelated text, for a stated false-hit rate.

A radius is a distance in the key space of one layer of one model: it cannot be guessed across models. Calibration
measures it on text that has nothing to do with the edits: the model's own generations from short generic openings
(the default), or texts the user passes. Never the evaluation's locality prompts.

1. Every background text goes through the model once; each GRACE layer of the adapter pools its input into a key
   as the adapter's key function does. For a centered key (``prompt_mean``) the mean of the pooled inputs becomes
   the codebook's ``key_center``.
   ``center=False`` leaves the center at zero: plain cosine between pooled inputs.
2. Each background key's distance to its nearest other background key is measured. The radius is the
   ``false_hit_rate`` quantile of those distances: with a codebook as dense as the background set, that fraction of
   unrelated prompts would find a key within the radius.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .background import background_texts
from .inputs import input_device
from .keys import keys_of_pooled, pool, uses_center
from .model import grace_layers, named_module


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`calibrate`: the radius for ``eps_init``, the key centers per module (empty for an
    uncentered key) and what they were measured on."""

    eps_init: float
    key_centers: dict[str, torch.Tensor]
    false_hit_rate: float
    texts: int
    nearest_distances: dict[str, list[float]]  # per module: each background key's distance to its nearest other


def calibrate(model: nn.Module, tokenizer, texts: Sequence[str] | None = None, *, false_hit_rate: float = 0.01,
              center: bool = True, adapter_name: str | None = None, batch_size: int = 16,
              progress: bool = True) -> Calibration:
    """Measure the radius (and, with ``center``, the key centers of a centered key) of ``adapter_name``'s GRACE
    layers on background text (``texts``, or :func:`background_texts` of the model); see
    :func:`apply_calibration` to use it. ``center=False`` keeps the center at zero (plain cosine keys)."""
    if not 0 < false_hit_rate < 1:
        raise ValueError(f"false_hit_rate must be between 0 and 1 (a fraction of unrelated prompts), got "
                         f"{false_hit_rate!r}.")
    adapter_name = adapter_name or _active_adapter(model)
    layers = grace_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"The model has no GRACE layer for adapter {adapter_name!r}; wrap it with get_peft_model "
                         "and a GraceConfig first.")
    if texts is None:
        texts = background_texts(model, tokenizer, progress=progress)
    texts = list(dict.fromkeys(text.strip() for text in texts if isinstance(text, str) and text.strip()))
    if len(texts) < 20:
        raise ValueError(f"Calibration needs at least 20 different background texts, got {len(texts)}.")
    kind = model.peft_config[adapter_name].key
    pooled = _pooled_inputs(model, tokenizer, texts, adapter_name, layers, kind, batch_size, progress)
    centers, nearest = {}, {}
    for name, vectors in pooled.items():
        mean = vectors.mean(0) if uses_center(kind) and center else None
        if mean is not None:
            centers[name] = mean
        keys = keys_of_pooled(kind, vectors, mean)
        distances = torch.cdist(keys, keys, compute_mode="donot_use_mm_for_euclid_dist")
        distances.fill_diagonal_(float("inf"))
        nearest[name] = sorted(distances.min(-1).values.tolist())
    radius = min(float(torch.tensor(values).quantile(false_hit_rate)) for values in nearest.values())
    if not radius > 0:
        raise ValueError("The background texts give keys that coincide (radius 0): pass more varied texts.")
    return Calibration(radius, centers, false_hit_rate, len(texts), nearest)


def apply_calibration(model: nn.Module, calibration: Calibration, adapter_name: str | None = None) -> None:
    """Set ``eps_init`` and the key centers of an adapter whose codebooks are still empty (keys made before would
    sit in another space)."""
    adapter_name = adapter_name or _active_adapter(model)
    layers = grace_layers(model, adapter_name)
    filled = [name for name, layer in layers.items() if len(layer.grace_codebook[adapter_name])]
    if filled:
        raise ValueError(f"Calibrate before editing: the codebooks of {', '.join(filled)} already hold keys, made "
                         "with the old center and radius. Start from a fresh adapter.")
    model.peft_config[adapter_name].eps_init = calibration.eps_init
    for name, layer in layers.items():
        codebook = layer.grace_codebook[adapter_name]
        codebook.eps_init = calibration.eps_init
        if codebook.key_center is not None:
            codebook.key_center.copy_(calibration.key_centers.get(name, torch.zeros_like(codebook.key_center)))


def _pooled_inputs(model, tokenizer, texts, adapter_name, layers, kind, batch_size,
                   progress) -> dict[str, torch.Tensor]:
    """Per layer, the pooled input of every text (the first half of the key function)."""
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []
    for name, layer in layers.items():
        def hook(module, args, name=name, layer=layer):
            inputs = args[0] if args[0].dim() == 3 else args[0].unsqueeze(1)
            query = layer._query_for(inputs)
            collected[name].append(pool(kind, inputs, query.positions, query.starts))
        key_module = model.peft_config[adapter_name].key_module
        source = layer if key_module is None else named_module(model, key_module)
        handles.append(source.register_forward_pre_hook(hook))
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), batch_size), desc="calibration", disable=not progress):
                batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                                  truncation=True, max_length=128)
                batch = {name: tensor.to(input_device(model)) for name, tensor in batch.items()}
                model(**batch)
    finally:
        tokenizer.padding_side = padding_side
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts).cpu() for name, parts in collected.items()}


def _active_adapter(model: nn.Module) -> str:
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        return active
    raise ValueError("Pass adapter_name: the model has no single active adapter.")
