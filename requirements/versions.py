"""Print which versions a test leg runs on: ``python requirements/versions.py LEG``."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "aenum", "tqdm")


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


if __name__ == "__main__":
    leg = sys.argv[1] if len(sys.argv) > 1 else "this environment"
    print(f"== {leg}: " + ", ".join(f"{name} {installed(name)}" for name in PACKAGES), flush=True)
