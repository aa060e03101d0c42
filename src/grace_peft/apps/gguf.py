"""Turn a GGUF file into a transformers checkpoint folder, once, so that every tool can take it as a model path.

transformers dequantizes a GGUF model to float32 when it loads it (slow: tens of seconds) and refuses to save it
as it is. :func:`convert_gguf` loads it once and saves a plain checkpoint folder; loading that takes seconds, and the
folder goes anywhere a model path does (``AutoModelForCausalLM.from_pretrained``, the ``grace-peft`` CLI,
``PeftModel.from_pretrained``). The folder appears complete or not at all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


def convert_gguf(gguf_path: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Save the GGUF model at ``gguf_path`` (float32) and its tokenizer as a checkpoint folder ``target``; a
    ``target`` that already holds a checkpoint is returned as it is."""
    source, target = Path(gguf_path), Path(target)
    if (target / "config.json").is_file():
        return target
    if not source.is_file():
        raise FileNotFoundError(f"No GGUF file at {source}.")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("Reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are already dequantized to float32; drop the GGUF marker that makes transformers refuse to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: another process sees either no folder or a complete one
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
