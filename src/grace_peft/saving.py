"""An adapter folder saved as one unit: a save that is killed, or two processes saving to the same folder at once,
leave a folder that loads as exactly one complete version (the old one or a new one), never the weights of one save
with the config of another.

peft reads an adapter from two fixed file names, and no file system replaces two files in one step. So the weights
file is made the unit: each save gives the adapter a ``save_id`` (a digest of its weights and config) and writes
it, with a copy of the whole config, into the metadata of ``adapter_model.safetensors``, and the same ``save_id``
into ``adapter_config.json``. Both files are written completely (and synced) in a staging folder first, then moved in,
weights first. A loader that finds the two ids differ (a save killed between the two moves, or two savers
interleaved) uses the config stored in the weights file: the version the weights belong to. Savers take turns under
a lock on the folder (released by the system when a saver is killed), and each save first removes the staging
folders that killed saves left behind.

Adapters saved before this scheme (no ``save_id``) and ``safe_serialization=False`` saves are read as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

from .atomic import default_file_mode

SAVE_ID = "save_id"  # the config field
WEIGHTS_SAVE_ID = "grace_save_id"  # metadata keys of the weights file
WEIGHTS_CONFIG = "grace_adapter_config"
STAGING_PREFIX = ".grace-save-"
CARD = "README.md"

try:
    import fcntl
except ImportError:  # Windows: no lock; the save ids still keep the folder loadable as one version
    fcntl = None


def save_as_one_unit(directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(folder)`` (a ``PeftModel.save_pretrained`` into ``folder``) in a staging folder, then move every
    adapter it wrote (``folder`` itself and peft's per-adapter subfolders) into ``directory``, each as one unit, and
    the model card beside them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        _remove_leftovers(directory)
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=STAGING_PREFIX))
        try:
            if (directory / CARD).is_file():  # peft updates an existing card rather than replacing it
                shutil.copyfile(directory / CARD, staging / CARD)
            write(str(staging))
            for folder in _adapter_folders(staging):
                _publish(folder, directory / folder.relative_to(staging))
            if (staging / CARD).is_file():
                _move_in(staging / CARD, directory / CARD)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def config_saved_with_weights(folder: str | os.PathLike) -> dict[str, Any] | None:
    """When ``adapter_config.json`` in a local adapter ``folder`` comes from another save than its weights file, the
    config the weights were saved with (and a warning); None when they belong together, or when the folder carries
    no save ids (saved before grace_peft tied them, or not local)."""
    folder = Path(folder)
    weights, config_path = folder / SAFETENSORS_WEIGHTS_NAME, folder / CONFIG_NAME
    if not (weights.is_file() and config_path.is_file()):
        return None
    try:
        with safe_open(weights, framework="pt") as file:
            metadata = file.metadata() or {}
        saved_id = json.loads(config_path.read_text(encoding="utf-8")).get(SAVE_ID)
    except Exception:  # unreadable files are reported by the loader that reads them, with its own message
        return None
    if WEIGHTS_SAVE_ID not in metadata or metadata[WEIGHTS_SAVE_ID] == saved_id:
        return None
    try:
        config = json.loads(metadata[WEIGHTS_CONFIG])
    except (KeyError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"{weights} is damaged: its metadata has a save id but no readable {WEIGHTS_CONFIG}, and "
                         f"{config_path} comes from another save. Load a complete copy of the adapter.")
    warnings.warn(f"{config_path} comes from another save than {weights} (a save was interrupted, or two processes "
                  "saved here at once); using the config saved with the weights.", stacklevel=3)
    return config


def _adapter_folders(staging: Path) -> list[Path]:
    folders = [staging, *(path for path in sorted(staging.iterdir()) if path.is_dir())]
    return [folder for folder in folders if (folder / CONFIG_NAME).is_file()]


def _publish(source: Path, target: Path) -> None:
    """Tie the config and weights in ``source`` together by a fresh save id and move them into ``target``, weights
    first: until the config arrives, the loader reads the new weights with the config they carry."""
    config = json.loads((source / CONFIG_NAME).read_text(encoding="utf-8"))
    config.pop(SAVE_ID, None)
    save_id = _content_digest(source, config)
    config[SAVE_ID] = save_id
    (source / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    weights = source / SAFETENSORS_WEIGHTS_NAME
    if weights.is_file():
        _add_metadata(weights, {WEIGHTS_SAVE_ID: save_id, WEIGHTS_CONFIG: json.dumps(config, sort_keys=True)})
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir(), key=lambda path: path.name == CONFIG_NAME):  # the config last
        if path.is_file():
            _move_in(path, target / path.name)


def _add_metadata(path: Path, entries: dict[str, str]) -> None:
    """Add ``entries`` to the metadata of a safetensors file. The header is rewritten with sorted keys (safetensors'
    own writer orders metadata at random), so that the same adapter always gives the same bytes; the tensor data
    after the header is copied unchanged (its offsets are relative to the end of the header)."""
    rewritten = path.with_name(path.name + ".metadata")
    with open(path, "rb") as source, open(rewritten, "wb") as target:
        header = json.loads(source.read(int.from_bytes(source.read(8), "little")))
        header["__metadata__"] = {**header.get("__metadata__", {}), **entries}
        encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
        target.write(len(encoded).to_bytes(8, "little") + encoded)
        shutil.copyfileobj(source, target, 1 << 20)
    os.replace(rewritten, path)


def _content_digest(source: Path, config: dict[str, Any]) -> str:
    """The save id: a digest of the weights and the config, so that saving the same adapter twice writes the same
    files (a Hub push of an unchanged adapter makes no commit) and different adapters get different ids."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (source / name).is_file():
            with open(source / name, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:32]


def _move_in(path: Path, target: Path) -> None:
    os.chmod(path, default_file_mode())  # safetensors writes a private file; give it a normal file's mode
    with open(path, "rb") as file:
        os.fsync(file.fileno())
    os.replace(path, target)
    _sync_folder(target.parent)


def _remove_leftovers(directory: Path) -> None:
    """Staging folders of killed saves (savers take turns under the lock, so none belongs to a running save)."""
    for path in directory.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _sync_folder(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (no lock file to leave behind), where the platform has one."""
    if fcntl is None:
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
