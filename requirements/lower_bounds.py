"""The declared dependencies of grace-peft pinned to their lower bounds (``name==bound`` lines), from pyproject.toml.

``make lock`` installs these as constraints to resolve the lowest leg's lock file (requirements/lowest.txt). torch is
left out: every leg uses the CPU build that the Makefile installs first (see README, "Tested versions").
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
UNPINNED = {"torch"}


def lower_bounds(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """Each declared dependency (but torch) and its ``>=`` bound; a dependency without one is an error."""
    bounds = {}
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(,.*)?", requirement)
        if match is None:
            raise ValueError(f"{requirement!r} in {pyproject} has no '>=' lower bound to test.")
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        if name not in UNPINNED:
            bounds[name] = match.group(2)
    return bounds


if __name__ == "__main__":
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in lower_bounds().items()))
