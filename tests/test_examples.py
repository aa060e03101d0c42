"""The examples run as written."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_edit_tiny_gpt2_example_runs_and_reports_taken_edits(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "edit_tiny_gpt2.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unchanged bit for bit: True" in result.stdout
    assert result.stdout.count("taken=True") == 2
    assert (tmp_path / "adapter_model.safetensors").exists()
