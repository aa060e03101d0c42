"""The GRACE tuner layer: wraps a Linear (or GPT-2 Conv1D) and replaces its output where the codebook hits."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .codebook import Codebook
from .keys import compute_keys, uses_center
from .query import CallState, ForwardQuery

MERGE_ERROR = (
    "GRACE adapters cannot be merged into the base weights: a codebook is a lookup table (replace this layer's "
    "output when the input is near a key), which no weight matrix can express. Keep the PeftModel for inference, "
    "or call `unload()` to get the unedited base model back."
)


class GraceLayer(BaseTunerLayer):
    """Common state of a GRACE-wrapped module: one :class:`Codebook` and one replacement mode per adapter.

    Per-call state (the query of the current forward, what a prefill hit, the editor's recordings and forced values)
    lives in ``call_state``, a :class:`~grace_peft.query.CallState` that the tuner shares between all GRACE layers
    of a model; a layer made on its own gets a private one.
    """

    adapter_layer_names: tuple[str, ...] = ("grace_codebook",)
    other_param_names: tuple[str, ...] = ("grace_replacement", "grace_key", "grace_key_module")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.grace_codebook = nn.ModuleDict({})
        self.grace_replacement: dict[str, str] = {}
        self.grace_key: dict[str, str] = {}
        self.grace_key_module: dict[str, str | None] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = widths(base_layer)
        self.call_state = CallState()

    def update_layer(self, adapter_name: str, config, codebook_shape: dict[str, int] | None = None,
                     key_dim: int | None = None) -> None:
        """Add an adapter's codebook to this layer (pre-sized by ``codebook_shape`` when it is about to load; keys
        of width ``key_dim`` when they come from another module than this one)."""
        self.grace_codebook[adapter_name] = Codebook(
            key_dim or self.in_features,
            self.out_features,
            eps_init=config.eps_init,
            expand_rule=config.eps_expand,
            split_rule=config.eps_split,
            key_center=uses_center(config.key),
            journal_limit=config.journal_limit,
            **(codebook_shape or {}),
        )
        self.grace_replacement[adapter_name] = config.replacement
        self.grace_key[adapter_name] = config.key
        self.grace_key_module[adapter_name] = config.key_module
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # peft's version also casts to the base layer's dtype; codebooks stay float32 (spec §7), only the device moves.
        if adapter_name not in self.grace_codebook:
            return
        if device is None:
            device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        codebook = self.grace_codebook[adapter_name]
        if device is None or any(tensor.is_meta for tensor in (*codebook.parameters(), *codebook.buffers())):
            return  # allocated empty for loading (low_cpu_mem_usage): load_state_dict(assign=True) places it
        codebook.to(device)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        raise NotImplementedError(MERGE_ERROR)


class Linear(nn.Module, GraceLayer):
    """GRACE around ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2): both map ``(..., in) -> (..., out)``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config,
                 codebook_shape: dict[str, int] | None = None, key_dim: int | None = None) -> None:
        super().__init__()
        GraceLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, codebook_shape, key_dim)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        adapters = [name for name in self.active_adapters if name in self.grace_codebook]
        if not adapters:
            return result
        flat = x.dim() == 2  # (batch, features): treat as sequences of length 1
        inputs, output = (x.unsqueeze(1), result.unsqueeze(1)) if flat else (x, result)
        query = self._query_for(inputs)
        for adapter in adapters:
            output = self._replace(adapter, inputs, output, query)
        return output.squeeze(1) if flat else output

    def _query_for(self, inputs: torch.Tensor) -> ForwardQuery:
        batch, length = inputs.shape[0], inputs.shape[1]
        current = self.call_state.current
        if current is None:  # called outside a hooked model forward: every token of every row is the prompt
            positions = torch.full((batch,), length - 1, dtype=torch.long, device=inputs.device)
            return ForwardQuery(positions=positions, decoding=False)
        if current.decoding:
            return current
        positions = current.positions.to(inputs.device)
        if positions.shape[0] != batch or int(positions.max()) >= length:
            raise ValueError(
                f"GRACE query positions {positions.tolist()} do not fit this layer's input of shape "
                f"{tuple(inputs.shape)}: the wrapped module does not see the model's token sequence. Target a module "
                "in the main token path (an MLP projection of a decoder or encoder block)."
            )
        starts = None if current.starts is None else current.starts.to(inputs.device)
        return ForwardQuery(positions=positions, decoding=False, prefill=current.prefill, starts=starts)

    def _replace(self, adapter: str, inputs: torch.Tensor, output: torch.Tensor, query: ForwardQuery) -> torch.Tensor:
        codebook = self.grace_codebook[adapter]
        mode = self.grace_replacement[adapter]
        batch, length = output.shape[0], output.shape[1]
        steps = torch.arange(length, device=output.device)
        if query.decoding:
            # Generated tokens never query; only replace_all keeps applying the prompt's value to them.
            hits = query.prefill.hits.get((self, adapter)) if query.prefill is not None else None
            if mode != "replace_all" or hits is None or hits.shape[0] != batch or not bool((hits >= 0).any()):
                return output
            values = codebook.values[hits.clamp_min(0)]
            mask = (hits >= 0)[:, None].expand(batch, length)
        else:
            rows = torch.arange(batch, device=output.device)
            positions = query.positions
            values = self.call_state.forced_values(self, adapter)
            if values is None or self.call_state.recording:
                keys = self._keys(adapter, inputs, query)
                self.call_state.record(self, adapter, keys, output[rows, positions])
            if values is None:
                hits = codebook.lookup(keys, self._allowed(codebook, query))
                self.call_state.searched(self, adapter, hits)
                if query.prefill is not None:
                    query.prefill.hits[(self, adapter)] = hits
                if not bool((hits >= 0).any()):
                    return output
                values = codebook.values[hits.clamp_min(0)]
                row_hit = hits >= 0
            else:
                row_hit = torch.ones(batch, dtype=torch.bool, device=output.device)
            if mode == "replace_last":
                span = steps[None, :] == positions[:, None]
            elif mode == "replace_prompt":
                span = steps[None, :] <= positions[:, None]
            else:
                span = torch.ones(batch, length, dtype=torch.bool, device=output.device)
            mask = span & row_hit[:, None]
        return torch.where(mask[..., None], values[:, None, :].to(output.dtype), output)

    @staticmethod
    def _allowed(codebook: Codebook, query: ForwardQuery) -> torch.Tensor | None:
        """Which entries each row may retrieve when some are gated by their edits' subjects (None: all)."""
        if codebook.gate_owners.numel() == 0:
            return None
        ids = query.prefill.input_ids if query.prefill is not None else None
        if ids is None:
            raise RuntimeError("This GRACE adapter's entries are gated by their edits' subjects "
                               "(GraceConfig.subject_gate): retrieving one needs the prompt's token ids. Call the "
                               "model with input_ids (not inputs_embeds), through its own forward or generate.")
        return codebook.gate_mask([ids[row, : position + 1].tolist()
                                   for row, position in enumerate(query.positions.tolist())])

    def _keys(self, adapter: str, inputs: torch.Tensor, query: ForwardQuery) -> torch.Tensor:
        """The keys of this forward's rows: from this layer's input, or from the input of the adapter's key module
        (kept by its pre-hook earlier in the same forward)."""
        key_module = self.grace_key_module.get(adapter)
        if key_module is not None:
            source = self.call_state.key_input(key_module)
            if source is None or source.shape[:2] != inputs.shape[:2]:
                raise RuntimeError(
                    f"GRACE key module '{key_module}' did not see this forward's tokens before the wrapped layer ran: "
                    "choose a key module that runs earlier in the same token sequence (a lower block's MLP "
                    "projection).")
            inputs = source if source.dim() == 3 else source.unsqueeze(1)
        codebook = self.grace_codebook[adapter]
        return compute_keys(self.grace_key[adapter], inputs, query.positions, query.starts, codebook.key_center)

    def __repr__(self) -> str:
        return "grace." + super().__repr__()


def widths(module: nn.Module) -> tuple[int, int]:
    """Input and output widths of a supported base layer (Conv1D stores its weight as ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    raise TypeError(f"GRACE wraps nn.Linear and transformers Conv1D modules, not {type(module).__name__}.")


def supported_base_layer(module: nn.Module) -> bool:
    """Whether GRACE can wrap this module."""
    return isinstance(module, (nn.Linear, Conv1D))
