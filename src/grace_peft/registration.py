"""Everything grace_peft changes outside its own objects, in one place.

Process-wide, done once by ``import grace_peft`` (:func:`install`; idempotent, so importing twice or reloading the
package is harmless):

1. ``PeftType`` gains a real member ``GRACE`` (peft's ``register_peft_method`` refuses other names, and
   transformers' ``load_adapter`` calls ``.value`` on the type, so a plain string will not do);
2. peft's method registry learns ``GraceConfig`` / ``GraceModel`` with the parameter prefix ``grace_``;
3. ``PeftModel.push_to_hub`` pushes GRACE adapters with :func:`grace_peft.hub.push_edits` (our model card) and
   leaves every other adapter to peft's own method;
4. a ``PeftModel.from_pretrained`` or ``PeftModel.load_adapter`` that raises (a corrupt codebook, say) takes back
   the GRACE layers and adapter it had already put in (the caller's base model, or the live PeftModel, is left as
   it was); both are peft's own methods otherwise, and nothing changes for other PEFT methods;
5. ``PeftModel.save_pretrained`` writes a model with GRACE adapters as one unit per adapter folder
   (:mod:`grace_peft.saving`); other models are saved by peft's own method;
6. transformers' ``model.load_adapter`` (``PeftAdapterMixin``), which sets tensors without the codebook's own load
   checks, checks the GRACE codebooks it loaded and, when they are corrupt or the load raises, deletes the adapter
   it added (and the GRACE layers, when no adapter is left).

Per model, done by :class:`grace_peft.GraceModel` when it wraps a model and undone by ``unload()``: a forward
pre-hook and a forward hook on the model (on the encoder of an encoder-decoder) that hand each call's query to the
layers, and a :class:`grace_peft.model.GenerateAsOneCall` wrapper on the model instance's ``generate``.
"""

from __future__ import annotations

import functools
import inspect
import os

from aenum import extend_enum
from peft.utils import PeftType

PEFT_METHOD_NAME = "grace"
ADAPTER_PREFIX = "grace_"

if "GRACE" not in PeftType.__members__:
    extend_enum(PeftType, "GRACE", "GRACE")
GRACE_PEFT_TYPE = PeftType.GRACE


def install(config_cls: type, model_cls: type) -> None:
    """Register GRACE with peft and wrap peft's ``push_to_hub``, ``from_pretrained`` and ``load_adapter`` (each a
    no-op when already done)."""
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method
    from transformers.integrations import PeftAdapterMixin

    from .hub import grace_push_to_hub

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(GRACE_PEFT_TYPE) is not None:
        # Already registered, possibly by an earlier copy of this module (importlib.reload): point the mappings
        # at the current classes so that isinstance checks keep working.
        PEFT_TYPE_TO_CONFIG_MAPPING[GRACE_PEFT_TYPE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[GRACE_PEFT_TYPE] = model_cls
    else:
        register_peft_method(name=PEFT_METHOD_NAME, config_cls=config_cls, model_cls=model_cls,
                             prefix=ADAPTER_PREFIX)
    _wrap_method(PeftModel, "push_to_hub", grace_push_to_hub)
    _wrap_method(PeftModel, "from_pretrained", _undone_on_error)
    _wrap_method(PeftModel, "load_adapter", _adapter_deleted_on_error)
    _wrap_method(PeftModel, "save_pretrained", _saved_as_one_unit)
    _wrap_method(PeftAdapterMixin, "load_adapter", _transformers_load_checked)


def _wrap_method(owner: type, name: str, make_wrapper) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)``, where ``original`` is the library's own method even when
    an earlier import already wrapped it (so that importing grace_peft again wraps it once, not twice)."""
    current = inspect.getattr_static(owner, name)
    is_classmethod = isinstance(current, classmethod)
    function = current.__func__ if is_classmethod else current
    original = getattr(function, "grace_peft_original", function)
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.grace_peft_original = original
    setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)


def _transformers_load_checked(load_adapter):
    """transformers' ``model.load_adapter`` that checks the GRACE codebooks it loaded and undoes a failed load."""

    def wrapper(self, *args, **kwargs):
        from .model import check_loaded_codebooks, forget_adapters, remove_grace

        before = set(getattr(self, "peft_config", None) or {})
        args, kwargs = _with_config_saved_with_weights(load_adapter, self, args, kwargs)
        try:
            result = load_adapter(self, *args, **kwargs)
            for name, config in (getattr(self, "peft_config", None) or {}).items():
                if name not in before and config.peft_type == GRACE_PEFT_TYPE:
                    check_loaded_codebooks(self, name)
            return result
        except Exception:
            added = [name for name, config in (getattr(self, "peft_config", None) or {}).items()
                     if name not in before and config.peft_type == GRACE_PEFT_TYPE]
            forget_adapters(self, added)
            if not before:
                remove_grace(self)
            raise

    return wrapper


def _with_config_saved_with_weights(load_adapter, model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of transformers' ``load_adapter``, given the config that a local folder's weights were saved
    with when its ``adapter_config.json`` comes from another save (peft's loaders get it from
    ``GraceConfig.from_pretrained``; this loader reads configs through ``PeftConfig``)."""
    from .config import GraceConfig
    from .saving import config_saved_with_weights

    try:
        bound = inspect.signature(load_adapter).bind(model, *args, **kwargs)
    except TypeError:
        return args, kwargs  # transformers raises its own error for these arguments
    folder = bound.arguments.get("peft_model_id")
    if "peft_config" not in bound.signature.parameters or bound.arguments.get("peft_config") is not None:
        return args, kwargs
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        return args, kwargs
    saved_with_weights = config_saved_with_weights(folder)
    if saved_with_weights is None:
        return args, kwargs
    bound.arguments["peft_config"] = GraceConfig.from_peft_type(**saved_with_weights)
    return bound.args[1:], bound.kwargs


def _saved_as_one_unit(save_pretrained):
    """``PeftModel.save_pretrained`` that, for a model with GRACE adapters, publishes each adapter folder as one
    unit (see :mod:`grace_peft.saving`)."""

    def wrapper(self, save_directory, *args, **kwargs):
        from .hub import is_replaceable_card, model_card
        from .saving import CARD, save_as_one_unit

        if not any(config.peft_type == GRACE_PEFT_TYPE for config in self.peft_config.values()):
            return save_pretrained(self, save_directory, *args, **kwargs)
        saved = kwargs.get("selected_adapters") or list(self.peft_config)
        described = "default" if "default" in saved else saved[0]  # the adapter saved at the folder's top level

        def write(folder: str) -> None:
            save_pretrained(self, folder, *args, **kwargs)
            card = os.path.join(folder, CARD)
            if self.peft_config[described].peft_type != GRACE_PEFT_TYPE or not kwargs.get("is_main_process", True):
                return
            if os.path.isfile(card):
                with open(card, encoding="utf-8") as file:
                    if not is_replaceable_card(file.read()):
                        return  # the user's own card, which peft has updated
            with open(card, "w", encoding="utf-8") as file:
                file.write(model_card(self, described))

        save_as_one_unit(save_directory, write)

    return wrapper


def _undone_on_error(from_pretrained):
    """``PeftModel.from_pretrained`` that, when it raises, removes the GRACE layers it put into the base model."""

    def wrapper(cls, model, *args, **kwargs):
        from .layer import GraceLayer
        from .model import remove_grace

        had_grace = any(isinstance(module, GraceLayer) for module in model.modules())
        try:
            return from_pretrained(cls, model, *args, **kwargs)
        except Exception:
            if not had_grace:
                remove_grace(model)
            raise

    return wrapper


def _adapter_deleted_on_error(load_adapter):
    """``PeftModel.load_adapter`` that refuses GRACE weights that do not match the adapter's config and, when it
    raises, deletes the GRACE adapter it had added."""

    def wrapper(self, model_id, adapter_name, *args, **kwargs):
        from .model import check_load_result

        new = adapter_name not in self.peft_config
        try:
            result = load_adapter(self, model_id, adapter_name, *args, **kwargs)
            if self.peft_config[adapter_name].peft_type == GRACE_PEFT_TYPE:
                check_load_result(result, adapter_name, model_id)
            return result
        except Exception:
            config = self.peft_config.get(adapter_name)
            if new and config is not None and config.peft_type == GRACE_PEFT_TYPE:
                self.delete_adapter(adapter_name)
            raise

    return wrapper
