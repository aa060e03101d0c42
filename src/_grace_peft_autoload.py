"""Lets ``PeftModel.from_pretrained`` (and transformers' ``load_adapter``) load a GRACE adapter in a program that
never imports grace_peft: when grace_peft is installed, the first ``import peft`` also imports grace_peft, which
registers the GRACE method with peft (as ``import grace_peft`` does).

Python runs this module at start-up through ``grace_peft_autoload.pth``. It imports nothing heavy itself: it waits
for peft to be imported. Set ``GRACE_PEFT_AUTOLOAD=0`` to switch it off.
"""

import os
import sys
import warnings
from importlib.abc import MetaPathFinder
from importlib.util import find_spec


class RegisterGraceAfterPeft(MetaPathFinder):
    """Finds peft once, and has its loader import grace_peft right after peft's own code has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        sys.meta_path.remove(self)
        spec = find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_peft = spec.loader.exec_module

        def exec_module(module):
            run_peft(module)
            try:
                import grace_peft  # noqa: F401
            except Exception as error:  # never break peft itself
                warnings.warn(f"grace_peft could not register GRACE with peft ({error!r}); GRACE adapters need "
                              "`import grace_peft` before they load.", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("GRACE_PEFT_AUTOLOAD", "1") != "0" and "peft" not in sys.modules:
    sys.meta_path.insert(0, RegisterGraceAfterPeft())
