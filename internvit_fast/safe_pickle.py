"""Reading pickles from files a user downloaded, without letting them run code.

Two readers, both built so that a file can only *describe data*:

- ``load_torch_file``: a ``torch.save`` zip file, through torch's own weights-only
  unpickler. Objects that unpickler refuses (mmengine's HistoryBuffer, numpy scalars in a
  Runner checkpoint's ``meta``) are found by disassembling the pickle first
  (``torch.serialization.get_unsafe_globals_in_checkpoint``) and each name is mapped to an
  inert ``Placeholder`` class for this one load, or to a real class the caller names in
  ``trusted`` (mmengine's own state types, for resuming a run). torch's unpickler lets
  BUILD touch only instances of allow-listed classes that the load itself created, SETITEM
  only exact dicts and APPEND only lists, so a file cannot set attributes on a function or
  class of the process (the attack on the old ``pickle.Unpickler`` subclass, which applied
  BUILD to anything on the stack). Legacy (non-zip) files are read with
  ``weights_only=True`` only: torch's legacy loader may write "patch" files when run
  unrestricted.

- ``load_dcp_metadata``: the ``.metadata`` pickle of a torch.distributed.checkpoint folder.
  torch reads it with plain ``pickle.load``. Here a restricted unpickler maps the few
  classes DCP writes onto this module's own inert ``Record`` objects (so not even DCP's
  ``__setstate__`` code runs), torch.Size and dtypes onto themselves, and refuses any other
  global, persistent ids, extension codes and every state-changing opcode on objects the
  load did not create.
"""
from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch


class UnsafeFileError(pickle.UnpicklingError):
    """A pickle that asks for something a data file never needs (a refused global or opcode)."""


# --- torch.save files -----------------------------------------------------------------------

class Placeholder:
    """Stands in for an object a checkpoint pickles that is not tensor data. Built without
    running any of the file's code; keeps nothing. ``name`` says what it replaced."""

    name = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return f"<skipped {self.name}>"


def _placeholder_for(name: str) -> type:
    # One class per name, created for one load: what a value was stays visible in its repr.
    return type("Placeholder", (Placeholder,), {"name": name, "__module__": __name__})


def is_zip_checkpoint(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def unsafe_globals(path: str) -> List[str]:
    """The globals in a torch.save zip file that torch's weights-only unpickler does not build."""
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def load_torch_file(path: str, trusted: Optional[Mapping[str, type]] = None, mmap: bool = True
                    ) -> Tuple[object, List[str]]:
    """``torch.load(path, weights_only=True)``, with every global it refuses replaced by an
    inert placeholder (or by ``trusted[name]`` where the caller trusts that exact class).

    Returns (object, names replaced by placeholders). Never unpickles without restriction.
    """
    trusted = dict(trusted or {})
    kw = dict(map_location="cpu", weights_only=True)
    if not is_zip_checkpoint(path):
        # Legacy serialisation: weights only, no placeholders (rare; re-save such a file with
        # a current torch to load it with objects beside the weights).
        return torch.load(path, **kw), []
    names = unsafe_globals(path)
    skipped = [n for n in names if n not in trusted]
    extra = [(trusted[n], n) for n in names if n in trusted] + [(_placeholder_for(n), n) for n in skipped]
    with torch.serialization.safe_globals(extra):
        return torch.load(path, mmap=mmap, **kw), skipped


# --- torch.distributed.checkpoint metadata ----------------------------------------------------

class Record:
    """An object DCP pickled (Metadata, TensorStorageMetadata, ...), as plain fields.

    ``kind`` is the class name it was pickled as; fields come from the pickled state (a dict
    for dataclasses, a tuple for TensorProperties, stored as ``state``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.state: tuple = ()

    def __repr__(self) -> str:
        return f"Record({self.kind}, {self.__dict__})"


_DCP_RECORDS = [
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
]


class _RecordClass:
    """What a DCP class name resolves to: calling ``__new__`` on it (NEWOBJ) makes a Record."""

    def __init__(self, kind: str):
        self.kind = kind


def _dcp_globals() -> Dict[str, object]:
    allowed: Dict[str, object] = {name: _RecordClass(name.rsplit(".", 1)[1]) for name in _DCP_RECORDS}
    allowed["torch.Size"] = torch.Size
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    allowed["collections.OrderedDict"] = OrderedDict
    # Values whose meaning the reader does not need, read as plain values (no torch or
    # pathlib code runs): the layout name, the memory-format enum, the folder's path.
    allowed["torch.serialization._get_layout"] = str
    allowed["torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING"] = int
    for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        allowed[f"pathlib.{cls}"] = _join_path
    return allowed


def _join_path(*parts) -> str:
    return "/".join(str(p) for p in parts)


_CALLABLE = (torch.Size, OrderedDict, str, int, _join_path)


class _DcpUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be replaced
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file):
        super().__init__(file)
        self._allowed = _dcp_globals()
        self._made: set = set()   # ids of the Records this load created (kept alive in _keep)
        self._keep: list = []

    def find_class(self, module, name):
        obj = self._allowed.get(f"{module}.{name}")
        if obj is None:
            raise UnsafeFileError(f"refused global {module}.{name}")
        return obj

    def _refuse(self, what):
        raise UnsafeFileError(f"refused pickle opcode {what}")

    def _newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, _RecordClass) or args:
            raise UnsafeFileError(f"refused NEWOBJ of {cls!r}")
        rec = Record(cls.kind)
        self._made.add(id(rec))
        self._keep.append(rec)
        self.append(rec)

    def _reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is c for c in _CALLABLE):
            raise UnsafeFileError(f"refused call of {func!r}"[:200])
        self.stack[-1] = func(*args)

    def _build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not Record or id(inst) not in self._made:
            raise UnsafeFileError(f"refused BUILD on {type(inst).__name__}")
        if isinstance(state, tuple) and len(state) == 2 and (state[1] is None or isinstance(state[1], dict)) \
                and isinstance(state[0], dict):
            state = {**state[0], **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            for k, v in state.items():
                if not isinstance(k, str) or k in ("kind", "__class__", "__dict__"):
                    raise UnsafeFileError(f"refused field {k!r}")
                inst.__dict__[k] = v
        elif isinstance(state, tuple):
            inst.state = state
        else:
            raise UnsafeFileError(f"refused state of type {type(state).__name__}")

    def _setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._target(dict)[key] = value

    def _setitems(self):
        items = self.pop_mark()
        target = self._target(dict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _append(self):
        value = self.stack.pop()
        self._target(list).append(value)

    def _appends(self):
        items = self.pop_mark()
        self._target(list).extend(items)

    def _additems(self):
        items = self.pop_mark()
        self._target(set).update(items)

    def _target(self, kind: type):
        target = self.stack[-1]
        if type(target) not in ((kind, OrderedDict) if kind is dict else (kind,)):
            raise UnsafeFileError(f"refused item assignment on {type(target).__name__}")
        return target


def _install(table: dict) -> None:
    p = pickle
    table[p.NEWOBJ[0]] = _DcpUnpickler._newobj
    table[p.REDUCE[0]] = _DcpUnpickler._reduce
    table[p.BUILD[0]] = _DcpUnpickler._build
    table[p.SETITEM[0]] = _DcpUnpickler._setitem
    table[p.SETITEMS[0]] = _DcpUnpickler._setitems
    table[p.APPEND[0]] = _DcpUnpickler._append
    table[p.APPENDS[0]] = _DcpUnpickler._appends
    table[p.ADDITEMS[0]] = _DcpUnpickler._additems
    # Opcodes a DCP metadata file never needs: objects from classes on the stack, persistent
    # ids and the copyreg extension registry (another way to name a global), out-of-band buffers.
    for op in (p.NEWOBJ_EX, p.INST, p.OBJ, p.PERSID, p.BINPERSID, p.EXT1, p.EXT2, p.EXT4,
               p.BYTEARRAY8, p.NEXT_BUFFER, p.READONLY_BUFFER):
        table[op[0]] = lambda self, op=op: self._refuse(op)


_install(_DcpUnpickler.dispatch)


def load_dcp_metadata(data: bytes) -> Record:
    """The ``Metadata`` record of a DCP folder's ``.metadata`` bytes (raises on anything else)."""
    obj = _DcpUnpickler(io.BytesIO(data)).load()
    if type(obj) is not Record or obj.kind != "Metadata":
        raise UnsafeFileError(f"expected DCP Metadata, found {type(obj).__name__}")
    return obj


def field(rec: object, name: str, kind: Optional[str] = None, default=None):
    """A field of a Record, checked to be one (of ``kind``) when it must be."""
    if type(rec) is not Record or (kind is not None and rec.kind != kind):
        raise UnsafeFileError(f"expected a {kind or 'record'}, found {rec!r}"[:200])
    return rec.__dict__.get(name, default)
