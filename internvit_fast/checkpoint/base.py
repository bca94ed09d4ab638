"""What every checkpoint reader shares: the error, lazy tensors, and the path checks for
names a file gives (an index's shard names, a folder's entries): inside the folder, and
regular files only."""
from __future__ import annotations

import os
import re
import stat
from typing import Optional, Tuple, Union

import torch

from . import safe_pickle


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file or key."""


class LazyTensor:
    """A tensor in a checkpoint file whose shape and dtype are known before it is read."""

    def __init__(self, shape, dtype: torch.dtype, read, where: str):
        self.shape, self.dtype, self._read, self.where = torch.Size(shape), dtype, read, where

    def load(self) -> torch.Tensor:
        try:
            return self._read()
        except Exception as e:  # noqa: BLE001 - an I/O or format error while reading
            raise CheckpointError(f"{self.where}: cannot read tensor ({type(e).__name__}: {e})") from None


Entry = Union[torch.Tensor, LazyTensor]


def materialize(v: Entry) -> torch.Tensor:
    return v.load() if isinstance(v, LazyTensor) else v


def inside(folder: str, name: str, where: str) -> str:
    """``folder/name`` for a file name an index or metadata file gives, refused unless it is
    a plain name inside ``folder`` (no ``..``, no absolute path, no link out of it)."""
    bad = (not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name
           or any(part in ("..", "") for part in re.split(r"[\\/]", name)))
    path = os.path.join(folder, name) if not bad else ""
    real_folder = os.path.realpath(folder or ".")
    if bad or os.path.commonpath([real_folder, os.path.realpath(path)]) != real_folder:
        raise CheckpointError(f"{where}: names a file outside its folder: {safe_pickle.brief(name)}")
    return path


def regular_file(path: str, where: str, folder: Optional[str] = None, max_bytes: Optional[int] = None) -> str:
    """``path`` if it is a regular file (not a FIFO, device or folder: opening those can block
    or never end), inside ``folder`` when one is given (links included), and at most
    ``max_bytes`` long; else a CheckpointError."""
    if folder is not None:
        inside(folder, os.path.relpath(path, folder), where)
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read {path} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{where}: {path} is not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise CheckpointError(f"{where}: {path} is {st.st_size} bytes, more than such a file ever needs")
    return path


def ints(v, what: str, where: str) -> Tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(type(i) is int and i >= 0 for i in v):
        raise CheckpointError(f"{where}: {what} is not a list of non-negative integers: {safe_pickle.brief(v)}")
    return tuple(v)
