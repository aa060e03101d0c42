"""atomic_file: the target holds the old content or the complete new one, and no temporary file is left behind."""

from __future__ import annotations

import os
import stat

import pytest

from grace_peft.atomic import atomic_file


def test_writes_text_and_binary(tmp_path):
    with atomic_file(tmp_path / "sub" / "a.json") as file:
        file.write('{"é": 1}')
    with atomic_file(tmp_path / "b.png", "wb") as file:
        file.write(b"\x89PNG")
    assert (tmp_path / "sub" / "a.json").read_text(encoding="utf-8") == '{"é": 1}'
    assert (tmp_path / "b.png").read_bytes() == b"\x89PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b.png", "sub"]


def test_an_error_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_file(target) as file:
        file.write("half of the new")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["result.json"]


def test_new_file_gets_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "a.txt") as file:
            file.write("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
