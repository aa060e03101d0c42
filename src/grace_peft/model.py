"""`GraceModel`: the PEFT tuner that puts GRACE layers into a model and wires up the query plumbing."""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from .codebook import CodebookContentError, corrupt_codebook_error, saved_codebook_problem
from .config import GraceConfig
from .inputs import is_encoder_decoder
from .layer import MERGE_ERROR, GraceLayer, Linear, supported_base_layer, widths
from .query import CallState
from .registration import ADAPTER_PREFIX

PEFT_WRAPPER_PREFIX = "base_model.model."  # what PeftModel puts before the transformers model's module names
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class GraceModel(BaseTuner):
    """Creates a GRACE model (lifelong editing with a codebook at chosen layers) from a transformers model.

    Use it through peft: ``get_peft_model(model, GraceConfig(target_modules=[...]))``, and edit with
    :class:`grace_peft.GraceEditor`. Merging is impossible (a codebook is a lookup, not a weight delta);
    ``unload()`` returns the clean base model.
    """

    prefix: str = ADAPTER_PREFIX
    tuner_layer_cls = GraceLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # Every adapter (the first one and each add_adapter) is checked whole before any module is replaced, so
        # that a refusal leaves the model as it was.
        config = self.peft_config[adapter_name]
        _check_adapter_name(adapter_name)
        _check_targets_exist(model, config)
        _check_targets_can_be_wrapped(model, config)
        _check_key_module(model, config)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _pre_injection_hook(self, model: nn.Module, config: GraceConfig, adapter_name: str) -> None:
        if "_call_state" not in self.__dict__:
            self._call_state = CallState(labels_mark_targets=_is_decoder_lm(model))

    def _prepare_adapter_config(self, peft_config: GraceConfig, model_config: dict) -> GraceConfig:
        if peft_config.target_modules is None:
            raise ValueError(
                "GraceConfig needs target_modules: GRACE edits one chosen layer, usually an MLP output projection, "
                "e.g. GraceConfig(target_modules=['model.layers.20.mlp.down_proj']) for a Llama-family model."
            )
        return peft_config

    def _create_and_replace(self, peft_config: GraceConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        codebook_shape = peft_config.codebook_sizes.get(current_key)
        key_dim = None
        if peft_config.key_module is not None:
            key_dim = widths(self.model.get_submodule(peft_config.key_module))[0]
        if isinstance(target, GraceLayer):
            target.update_layer(adapter_name, peft_config, codebook_shape, key_dim)
            return
        new_module = Linear(target, adapter_name, peft_config, codebook_shape, key_dim)
        new_module.call_state = self._call_state
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: GraceConfig, adapter_name: str) -> None:
        state = self._call_state
        if config.key_module is not None and config.key_module not in state.key_modules:
            key_module = model.get_submodule(config.key_module)
            state.hooks.append(key_module.register_forward_pre_hook(state.key_input_hook(config.key_module)))
            state.key_modules.add(config.key_module)
        if state.generate_wrapped:
            return
        hooked = _query_hook_module(model)
        state.hooks = [
            hooked.register_forward_pre_hook(state.pre_forward_hook, with_kwargs=True),
            hooked.register_forward_hook(state.post_forward_hook, always_call=True),  # also after a forward that raised
        ]
        state.generate_wrapped = True
        generate = getattr(model, "generate", None)
        if callable(generate):
            # Every route to generation (PeftModel.generate, pipelines, model.generate) ends here, so this is where
            # one generate call is marked as one call (spec §5).
            if isinstance(generate, GenerateAsOneCall):  # left by an earlier GRACE model of this base
                generate = generate.generate
            model.generate = GenerateAsOneCall(generate, state)

    # ------------------------------------------------------------------------------------------ merging / unloading
    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        _remove_plumbing(model, self._call_state)
        return model

    # ------------------------------------------------------------------------------------------ persistence
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: GraceConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor], unwanted_adapter_names: list[str]):
        # Saved shapes differ from a fresh model's: the config file written next records them, so that a loader can
        # allocate them first (spec §7). The live config keeps its own value.
        config.record_codebook_sizes_on_save(codebook_sizes(model, adapter_name))
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)


def grace_layers(model: nn.Module, adapter_name: str) -> dict[str, GraceLayer]:
    """The GRACE layers that hold ``adapter_name``, by module name in the transformers model (the names of
    ``target_modules`` and of ``adapter_config.json``, without the PeftModel's ``base_model.model.``)."""
    return {
        name.removeprefix(PEFT_WRAPPER_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, GraceLayer) and adapter_name in module.grace_codebook
    }


def named_module(model: nn.Module, name: str) -> nn.Module:
    """The module of ``model`` (a PeftModel or the transformers model) named ``name`` in the transformers model."""
    for full_name, module in model.named_modules():
        if full_name.removeprefix(PEFT_WRAPPER_PREFIX) == name:
            return module
    raise ValueError(f"{type(model).__name__} has no module named {name!r}.")


def codebook_sizes(model: nn.Module, adapter_name: str) -> dict[str, dict[str, int]]:
    """Codebook shapes (``size``: entries, ``label_size``: label tokens) of ``adapter_name`` per wrapped module."""
    return {name: layer.grace_codebook[adapter_name].shape_record()
            for name, layer in grace_layers(model, adapter_name).items()}


def check_loaded_codebooks(model: nn.Module, adapter_name: str) -> None:
    """Raise :class:`CodebookContentError` when a codebook of ``adapter_name`` holds what no codebook can (for
    loaders that set tensors without the codebook's own load checks, such as transformers' ``load_adapter``)."""
    for name, layer in grace_layers(model, adapter_name).items():
        problem = saved_codebook_problem(layer.grace_codebook[adapter_name].state_dict())
        if problem is not None:
            raise corrupt_codebook_error(name, problem)


def check_load_result(result: Any, adapter_name: str, source: Any) -> None:
    """Refuse a load whose weights file and config do not belong together: GRACE tensors for modules this model does
    not wrap, or a wrapped module without its saved codebook (``result``: the missing / unexpected keys of the
    load, as peft's ``load_adapter`` returns them)."""
    unexpected = sorted({key.split(".grace_codebook.")[0] for key in getattr(result, "unexpected_keys", ())
                         if ".grace_codebook." in key})
    missing = sorted({key.split(".grace_codebook.")[0] for key in getattr(result, "missing_keys", ())
                      if f".grace_codebook.{adapter_name}." in key})
    if unexpected or missing:
        what = (f"codebooks for modules this adapter does not wrap ({', '.join(unexpected)})" if unexpected else
                f"no codebook for wrapped module(s) {', '.join(missing)}")
        raise CodebookContentError(
            f"The adapter in {source} does not hang together: its weights hold {what}. Its adapter_config.json and "
            "adapter_model.safetensors come from different saves; load a complete copy (nothing was changed)."
        )


def forget_adapters(model: nn.Module, adapter_names: list[str]) -> None:
    """Remove GRACE adapters that transformers' ``load_adapter`` added to ``model`` (its own ``delete_adapter`` asks
    for a newer peft in newer releases): from every layer and from ``model.peft_config``."""
    for module in model.modules():
        if isinstance(module, GraceLayer):
            for name in adapter_names:
                if name in module.grace_codebook:
                    module.delete_adapter(name)
    configs = getattr(model, "peft_config", None)
    if configs is None:
        return
    for name in adapter_names:
        configs.pop(name, None)
    if not configs:
        del model.peft_config
        model._hf_peft_config_loaded = False  # transformers' flag for "peft_config exists"; no public setter


def remove_grace(model: nn.Module) -> None:
    """Put back every module that GRACE wrapped in ``model`` (a transformers model) and remove the hooks and the
    ``generate`` wrapper it installed: the model as it was before GRACE touched it (after a load that failed)."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, GraceLayer)]
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    for state in {id(layer.call_state): layer.call_state for _, layer in layers}.values():
        _remove_plumbing(model, state)


def _remove_plumbing(model: nn.Module, state: CallState) -> None:
    """Remove the query hooks of ``state`` and grace_peft's own ``generate`` wrapper (what it wrapped comes back)."""
    for handle in state.hooks:
        handle.remove()
    state.hooks = []
    state.key_modules = set()
    state.generate_wrapped = False
    wrapper = model.__dict__.get("generate")
    if isinstance(wrapper, GenerateAsOneCall):
        if wrapper.generate == type(model).generate.__get__(model):
            del model.generate
        else:
            model.generate = wrapper.generate


class GenerateAsOneCall:
    """A model's ``generate``, run as one call of its :class:`CallState`: the first forward is the prefill, every
    later one continues it. GraceModel installs it on the model instance and ``unload()`` removes it."""

    def __init__(self, generate, state: CallState) -> None:
        self.generate = generate
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any):
        with self.state.generation():
            return self.generate(*args, **kwargs)


def _is_decoder_lm(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return not is_encoder_decoder(model) and callable(can_generate) and bool(can_generate())


def _query_hook_module(model: nn.Module) -> nn.Module:
    """The module whose inputs (ids, attention mask, labels) are the token sequence the wrapped layers see."""
    if is_encoder_decoder(model):
        return model.get_encoder()
    return model


def _check_sees_input_tokens(model: nn.Module, target: nn.Module, name: str) -> None:
    if is_encoder_decoder(model):
        if not any(module is target for module in model.get_encoder().modules()):
            raise NotImplementedError(
                f"'{name}' is in the decoder of an encoder-decoder model. GRACE edits encoder layers of such models "
                "(as the paper did with T5): target an encoder FFN, e.g. 'encoder.block.5.layer.1.DenseReluDense.wo'."
            )


def _check_adapter_name(name: str) -> None:
    """An adapter name becomes a folder name on save: refuse anything but a plain name."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{name!r} cannot be an adapter name: save_pretrained makes it a folder name, so it must be a plain name "
            "(letters, digits, '_', '-', '.'; no path separators, not '.' or '..'), e.g. 'default' or 'team-a'."
        )


def _check_targets_can_be_wrapped(model: nn.Module, config: GraceConfig) -> None:
    """Check every target before any module is replaced, so that a refusal leaves the model as it was."""
    if config.target_modules is None:
        return
    for name, module in model.named_modules():
        if not name or isinstance(module, GraceLayer) or not check_target_module_exists(config, name):
            continue
        if not supported_base_layer(module):
            raise TypeError(
                f"GRACE wraps nn.Linear and transformers Conv1D modules, but target '{name}' is a "
                f"{type(module).__name__}. Target a projection inside it (for example its MLP down/output projection)."
            )
        _check_sees_input_tokens(model, module, name)
        _check_not_offloaded(model, module, name)


def _check_not_offloaded(model: nn.Module, target: nn.Module, name: str) -> None:
    """Refuse a target whose weights accelerate offloads (to CPU or disk) or that has no weights (meta device)."""
    if _offloaded_by_hook(model, target, name):
        why = ("accelerate offloads it (device_map sent its block to 'disk', or to 'cpu' next to GPUs: its weights "
               "stay there and are only brought to the execution device for each forward)")
        block = _device_map_entry(model, name)
        fix = (f"Map that block to a GPU in device_map, e.g. device_map={{..., '{block}': 0}} (or to 'cpu' when the "
               "whole model runs on CPU), or load the model without offloading.")
    elif any(parameter.is_meta for parameter in target.parameters()):
        why = "its weights are on the meta device (no data: the model was created empty or its weights offloaded)"
        fix = "Load the model's real weights first (no init_empty_weights, no device_map='meta'), then add GRACE."
    else:
        return
    raise ValueError(
        f"Cannot put a GRACE codebook on '{name}': {why}. A codebook needs the layer's real weights and a real device "
        f"next to it: every edit probes the layer and trains a value through it, and keys, values and distances live "
        f"on the layer's device. {fix}"
    )


def _offloaded_by_hook(model: nn.Module, target: nn.Module, name: str) -> bool:
    """Whether an accelerate hook on ``target``, or one on an ancestor that places its submodules, offloads it."""
    parts = name.split(".")
    for depth in range(len(parts) + 1):
        module = model.get_submodule(".".join(parts[:depth]))
        hook = getattr(module, "_hf_hook", None)
        for part in getattr(hook, "hooks", (hook,)):  # accelerate's SequentialHook holds several
            offloads = getattr(part, "offload", False) or getattr(part, "weights_map", None) is not None
            if offloads and (module is target or getattr(part, "place_submodules", False)):
                return True
    return False


def _device_map_entry(model: nn.Module, name: str) -> str:
    """The ``device_map`` key that places module ``name`` (its block, e.g. ``model.layers.27``)."""
    for key in getattr(model, "hf_device_map", None) or {}:
        if name == key or name.startswith(f"{key}."):
            return key
    parts = name.split(".")
    numbered = next((index for index, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[: numbered + 1])


def target_suggestions(model: nn.Module, wanted: list[str]) -> str:
    """A hint for target names that match nothing: the wrappable modules closest to them (or a few examples)."""
    wrappable = [name for name, module in model.named_modules() if supported_base_layer(module)]
    close = sorted({match for want in wanted for match in difflib.get_close_matches(want, wrappable, n=3)})
    return f"Close matches: {close}." if close else f"Some wrappable modules: {wrappable[-4:]}."


def _check_key_module(model: nn.Module, config: GraceConfig) -> None:
    """The key module must exist and be a projection whose input width is known (a Linear or Conv1D)."""
    if config.key_module is None:
        return
    try:
        module = model.get_submodule(config.key_module)
    except AttributeError:
        wanted = [config.key_module]
        raise ValueError(f"GraceConfig.key_module {config.key_module!r} is not a module of {type(model).__name__}. "
                         f"{target_suggestions(model, wanted)} Give its full name.") from None
    if isinstance(module, GraceLayer):
        module = module.get_base_layer()
    if not supported_base_layer(module):
        raise TypeError(f"GraceConfig.key_module '{config.key_module}' is a {type(module).__name__}; the key is made "
                        "of the input of a Linear or Conv1D (for example a lower block's MLP down projection).")
    _check_sees_input_tokens(model, module, config.key_module)


def _check_targets_exist(model: nn.Module, config: GraceConfig) -> None:
    """Fail early, naming close matches, when target_modules matches nothing."""
    if config.target_modules is None:
        return
    names = [name for name, _ in model.named_modules() if name]
    if any(check_target_module_exists(config, name) for name in names):
        return
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else sorted(config.target_modules)
    raise ValueError(
        f"GraceConfig.target_modules {wanted} matched no module of {type(model).__name__}. "
        f"{target_suggestions(model, wanted)} Give full names, "
        "name suffixes (e.g. 'mlp.down_proj' matches every layer) or one regex matched against the full name."
    )
