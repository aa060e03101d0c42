"""Key functions: how a GRACE layer turns its input over a prompt into the vector its codebook searches.

PEFT-free, on plain tensors. A key function takes the layer's input ``inputs`` of shape ``(batch, length, d)``, the
query position of each row ``positions`` (the last prompt token) and the first non-padding position ``starts``, and
returns one key per row, ``(batch, d)``. The codebook compares keys by Euclidean distance, so a function that puts
keys on the unit sphere makes that distance a function of the cosine (``|a - b| = sqrt(2 - 2 cos)``), and the
GRACE rules (ADD / EXPAND / SPLIT with radii) work unchanged in that space.

* ``last_token``: the input at the query token (the paper's key, raw: radii in the layer's activation scale);
* ``prompt_mean``: the mean of the inputs over the prompt's tokens (``starts`` to ``positions``), minus the
  codebook's ``key_center`` (a background mean; zero until calibrated), on the unit sphere.
"""

from __future__ import annotations

import torch

KEY_FUNCTIONS = ("last_token", "prompt_mean")


def uses_center(kind: str) -> bool:
    """Whether the key function ``kind`` subtracts the codebook's ``key_center``."""
    return kind == "prompt_mean"


def compute_keys(kind: str, inputs: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor | None,
                 center: torch.Tensor | None = None) -> torch.Tensor:
    """The keys of a batch (float32, ``(batch, d)``) by the key function ``kind``."""
    return keys_of_pooled(kind, pool(kind, inputs, positions, starts), center)


def pool(kind: str, inputs: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """The first half of a key function: one vector per row, in the layer's input space (float32)."""
    if kind == "last_token":
        return inputs[torch.arange(inputs.shape[0], device=inputs.device), positions].float()
    if kind == "prompt_mean":
        return prompt_mean(inputs, positions, starts)
    raise ValueError(f"Unknown GRACE key function {kind!r}; choose one of {', '.join(KEY_FUNCTIONS)}.")


def keys_of_pooled(kind: str, pooled: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """The second half: the key of each pooled vector (centered and on the unit sphere for ``prompt_mean``)."""
    if not uses_center(kind):
        return pooled
    return unit(pooled - (0 if center is None else center.to(pooled.device)))


def prompt_mean(inputs: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``inputs`` over positions ``starts..positions`` (inclusive) of each row, in float32."""
    steps = torch.arange(inputs.shape[1], device=inputs.device)
    first = torch.zeros_like(positions) if starts is None else starts.to(positions.device)
    span = (steps[None, :] >= first[:, None]) & (steps[None, :] <= positions[:, None])
    weights = span.float() / span.sum(-1, keepdim=True).clamp_min(1)
    return torch.einsum("bl,bld->bd", weights, inputs.float())


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 (a zero row stays zero)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
