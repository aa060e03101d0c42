"""grace_peft: lifelong model editing with GRACE, as a PEFT tuner.

``import grace_peft`` registers the method with peft; after that ``get_peft_model(model, GraceConfig(...))``,
``PeftModel.from_pretrained`` and transformers' ``model.load_adapter`` work as for any PEFT method. Everything the
import changes outside grace_peft is listed in :mod:`grace_peft.registration`.
"""

from .background import background_texts
from .calibration import Calibration, apply_calibration, calibrate
from .codebook import (
    Codebook,
    CodebookContentError,
    CodebookOperation,
    CodebookShapeError,
    CodebookUpdate,
    ExpandRule,
    SplitRule,
)
from .config import GraceConfig
from .editing import EditReport, EditsPartlyApplied, GraceEditor
from .hub import model_card, push_edits
from .inputs import Edit, Task
from .layer import GraceLayer, Linear
from .model import GraceModel, codebook_sizes
from .registration import install

install(GraceConfig, GraceModel)

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "Codebook",
    "CodebookContentError",
    "CodebookOperation",
    "CodebookShapeError",
    "CodebookUpdate",
    "Edit",
    "EditReport",
    "EditsPartlyApplied",
    "ExpandRule",
    "GraceConfig",
    "GraceEditor",
    "GraceLayer",
    "GraceModel",
    "Linear",
    "SplitRule",
    "Task",
    "apply_calibration",
    "background_texts",
    "calibrate",
    "codebook_sizes",
    "model_card",
    "push_edits",
]
