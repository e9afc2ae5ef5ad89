"""Safe files: atomic writes (temp file + rename) and checkpoints that load without running code."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded; the message names the file."""


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_save(path: Path, obj: Any, *, save: Callable[[Any, Path], None] | None = None) -> None:
    """Save with ``save(obj, tmp)`` (default torch.save) atomically."""
    saver = save or (lambda o, p: torch.save(o, p))
    _atomic(path, lambda tmp: saver(obj, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (saved by torch.save)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: the file holds pickled objects beyond tensors and plain data "
            f"(it could run code when loaded): {str(error).splitlines()[0]}"
        ) from error
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint: {type(error).__name__}: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dictionary checkpoint, got {type(data).__name__}")
    return data
