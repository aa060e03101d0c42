"""An adapter folder is saved as one unit: whatever moment a save is killed at, and however two processes interleave
their saves, the folder loads afterwards as exactly one complete version (old or new), on every loading route, and
the next successful save leaves no leftovers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import warnings

import pytest
import torch
from conftest import EDITS, TINY_MODELS, apply_edits, wrap
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from grace_peft import saving
from grace_peft.adapter_files import read_adapter_config, read_codebooks
from grace_peft.atomic import default_file_mode

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills and races use os.fork")

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FILES = {"README.md", CONFIG, WEIGHTS}
# Calls after which the disk can look different: a kill is tried before each of them.
MUTATING = {"replace", "rename", "fsync", "open", "write", "unlink", "rmdir", "mkdir", "chmod", "serialize_file",
            "copyfile", "rmtree"}


@pytest.fixture(scope="module")
def versions():
    """Two versions of one adapter (1 edit and 3 edits: different codebook sizes) and what each must load as."""
    tm = TINY_MODELS["gpt2"]()
    old, new = wrap(tm), wrap(tm)
    apply_edits(old, tm, EDITS[:1])
    apply_edits(new, tm, EDITS)
    return tm, old, new


def state(model) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model)


def same_state(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return found.keys() == expected.keys() and all(torch.equal(found[key], expected[key]) for key in found)


def loads_as(versions, folder) -> str:
    """Which version ``folder`` loads as ("old", "new"): its tensors bit for bit, and a config whose recorded
    codebook size matches them; fails on anything else."""
    tm, old, new = versions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tm.fresh(), folder)
    found = state(loaded)
    for name, model in (("old", old), ("new", new)):
        if same_state(found, state(model)):
            (sizes,) = loaded.peft_config["default"].codebook_sizes.values()
            assert sizes["size"] == codebook_size(found), f"{folder}: the config is from another version"
            return name
    raise AssertionError(f"{folder} loads as neither version: {sorted(os.listdir(folder))}")


def codebook_size(found: dict[str, torch.Tensor]) -> int:
    (keys,) = [tensor for name, tensor in found.items() if name.endswith("grace_codebook.keys")]
    return keys.shape[0]


def in_child(work, *, kill_at: int | None = None) -> int:
    """Run ``work()`` in a forked process; with ``kill_at``, the child SIGKILLs itself just before its
    ``kill_at``-th disk-changing call. Returns the number of such calls the child reached (its exit code)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        calls = 0

        def profile(frame, event, function):
            nonlocal calls
            if event == "c_call" and getattr(function, "__name__", "") in MUTATING:
                if calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls += 1

        try:
            sys.setprofile(profile)
            work()
            sys.setprofile(None)
        except BaseException:
            os._exit(255)
        os._exit(min(calls, 254))
    _, status = os.waitpid(pid, 0)
    if kill_at is not None and os.WIFSIGNALED(status):
        return -1
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) != 255, f"the child failed: {status}"
    return os.WEXITSTATUS(status)


def leftovers(folder) -> set[str]:
    return set(os.listdir(folder)) - ADAPTER_FILES


def test_a_save_writes_the_usual_files_tied_by_one_save_id(versions, tmp_path):
    _, _, new = versions
    new.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == ADAPTER_FILES
    config = json.loads((tmp_path / CONFIG).read_text())
    with safe_open(tmp_path / WEIGHTS, framework="pt") as file:
        metadata = file.metadata()
    assert metadata[saving.WEIGHTS_SAVE_ID] == config["save_id"] and len(config["save_id"]) == 32
    assert json.loads(metadata[saving.WEIGHTS_CONFIG]) == config
    assert oct((tmp_path / WEIGHTS).stat().st_mode & 0o777) == oct(default_file_mode())
    weights = (tmp_path / WEIGHTS).read_bytes()
    new.save_pretrained(tmp_path)  # the id is a digest: the same adapter saves to the same bytes
    assert (tmp_path / WEIGHTS).read_bytes() == weights and json.loads((tmp_path / CONFIG).read_text()) == config
    versions[1].save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["save_id"] != config["save_id"]


@pytest.fixture
def mixed(versions, tmp_path):
    """A folder with the new version's weights and the old version's config: a save killed between its moves."""
    tm, old, new = versions
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(tmp_path / "old" / CONFIG, folder / CONFIG)
    shutil.copy(tmp_path / "new" / WEIGHTS, folder / WEIGHTS)
    return tm, folder


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_weights_of_one_save_with_the_config_of_another_load_as_the_weights_version(versions, mixed,
                                                                                   low_cpu_mem_usage):
    tm, folder = mixed
    with pytest.warns(UserWarning, match="comes from another save than"):
        loaded = PeftModel.from_pretrained(tm.fresh(), folder, low_cpu_mem_usage=low_cpu_mem_usage)
    assert same_state(state(loaded), state(versions[2]))


def test_every_loading_route_reads_a_mixed_folder_as_the_weights_version(versions, mixed):
    tm, folder = mixed
    new_size = codebook_size(state(versions[2]))
    model = wrap(tm)  # peft's load_adapter beside a live adapter
    with pytest.warns(UserWarning, match="comes from another save than"):
        model.load_adapter(folder, adapter_name="other")
    assert model.peft_config["other"].save_id != json.loads((folder / CONFIG).read_text())["save_id"]
    base = tm.fresh()  # transformers' own load_adapter
    with pytest.warns(UserWarning, match="comes from another save than"):
        base.load_adapter(str(folder))
    (codebook,) = [module.grace_codebook["default"] for module in base.modules() if hasattr(module, "grace_codebook")]
    assert len(codebook) == new_size
    with pytest.warns(UserWarning, match="comes from another save than"):  # without a model: the CLI
        assert read_adapter_config(folder)["save_id"] != json.loads((folder / CONFIG).read_text())["save_id"]
    (tensors,) = read_codebooks(folder).values()
    assert tensors["keys"].shape[0] == new_size


def test_a_damaged_save_id_tie_is_refused_with_the_file_named(mixed):
    tm, folder = mixed
    tensors = load_file(folder / WEIGHTS)
    save_file(tensors, folder / WEIGHTS, metadata={saving.WEIGHTS_SAVE_ID: "x", saving.WEIGHTS_CONFIG: "{nope"})
    with pytest.raises(ValueError, match=f"{WEIGHTS} is damaged"):
        PeftModel.from_pretrained(tm.fresh(), folder)


def test_a_save_killed_at_any_point_leaves_one_complete_version(versions, tmp_path):
    tm, old, new = versions
    folder = tmp_path / "edits"
    seen = []
    for kill_at in range(1000):  # kill before the 0th, 1st, ... disk-changing call until a save gets through
        old.save_pretrained(folder)
        killed = in_child(lambda: new.save_pretrained(folder), kill_at=kill_at) == -1
        seen.append(loads_as(versions, folder))
        if not killed:
            break
    assert len(seen) > 20 and seen[0] == "old" and seen[-1] == "new"
    assert seen == sorted(seen, key=("old", "new").index)  # the switch happens at one point: new, then never old
    old.save_pretrained(folder)
    assert leftovers(folder) == set() and loads_as(versions, folder) == "old"


def test_saves_killed_at_random_moments_leave_one_complete_version(versions, tmp_path):
    tm, old, new = versions
    folder = tmp_path / "edits"
    old.save_pretrained(folder)
    start = time.perf_counter()
    in_child(lambda: new.save_pretrained(folder))
    duration = time.perf_counter() - start
    rng = random.Random(0)
    for _ in range(12):
        pid = os.fork()
        if pid == 0:
            try:
                for model in (new, old, new, old, new):
                    model.save_pretrained(folder)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 3 * duration))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert loads_as(versions, folder) in ("old", "new")
    new.save_pretrained(folder)
    assert leftovers(folder) == set() and loads_as(versions, folder) == "new"


@pytest.mark.parametrize("with_lock", [True, False], ids=["locked", "no-lock-platform"])
def test_two_processes_saving_at_once_leave_one_complete_version(versions, tmp_path, monkeypatch, with_lock):
    tm, old, new = versions
    folder = tmp_path / "edits"
    if not with_lock:  # as on a platform without locks: the save ids alone keep the folder whole
        monkeypatch.setattr(saving, "fcntl", None)
    children = []
    for model in (old, new):
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(8):
                    model.save_pretrained(folder)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status)
    assert loads_as(versions, folder) in ("old", "new")
    if with_lock:
        assert leftovers(folder) == set()
    new.save_pretrained(folder)
    assert leftovers(folder) == set() and loads_as(versions, folder) == "new"


def test_a_folder_saved_before_save_ids_loads_as_before(versions, tmp_path):
    tm, old, _ = versions
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    del config["save_id"]
    (tmp_path / CONFIG).write_text(json.dumps(config))
    save_file(load_file(tmp_path / WEIGHTS), tmp_path / WEIGHTS, metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert loads_as(versions, tmp_path) == "old"


