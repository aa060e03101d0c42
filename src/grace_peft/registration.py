"""Registration of GRACE as a PEFT method, with stock peft: a real ``PeftType`` member, then
``register_peft_method``. Both steps are idempotent, so importing grace_peft twice (or reloading it) is harmless."""

from __future__ import annotations

from aenum import extend_enum
from peft.utils import PeftType

PEFT_METHOD_NAME = "grace"
ADAPTER_PREFIX = "grace_"

# transformers' `load_adapter` calls `.value` on the peft type, so a plain string will not do: it must be a member.
if "GRACE" not in PeftType.__members__:
    extend_enum(PeftType, "GRACE", "GRACE")
GRACE_PEFT_TYPE = PeftType.GRACE


def register(config_cls: type, model_cls: type) -> None:
    """Make ``GraceConfig``/``GraceModel`` known to peft (no-op when they already are)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(GRACE_PEFT_TYPE) is not None:
        # Already registered, possibly by an earlier copy of this module (importlib.reload): point the mappings
        # at the current classes so that isinstance checks keep working.
        PEFT_TYPE_TO_CONFIG_MAPPING[GRACE_PEFT_TYPE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[GRACE_PEFT_TYPE] = model_cls
        return
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=ADAPTER_PREFIX)
