"""Reading pickles from files a user downloaded, without letting them run code or take the
process down.

Every pickle is first *scanned* (``scan``): its opcodes are walked once, with an abstract
stack that knows only shapes of data, before anything is built. The scan refuses what a
data file never needs and what would let a tiny file cost the process its life:

- globals outside the reader's allow-list, persistent ids other than torch's storages,
  extension codes, out-of-band buffers, ``INST``/``OBJ``/``NEWOBJ_EX``;
- nesting deeper than ``MAX_DEPTH`` (hashing or freeing a 200,000-deep tuple recurses in C
  and crashes the interpreter), and hashable values (tuples, frozensets) whose expanded
  size exceeds ``MAX_TREE`` (a memoized DAG of tuples is exponential to hash, compare or
  print);
- calls whose arguments allocate what the file does not hold: ``bytearray(n)``, codecs
  other than latin-1 (``_codecs.encode`` is how protocol 2 spells bytes; other codecs import
  modules), numpy arrays that do not start empty, and tensors whose size and strides reach
  past their storage (torch would grow the storage to fit);
- tensor kinds a checkpoint of this model never holds (wrapper subclasses, nested, device
  tensors).

Then two readers build the objects:

- ``load_torch_file``: a ``torch.save`` zip file (its structure checked first: uncompressed
  entries, as torch.save writes them, every storage record as long as its storage), through
  torch's own weights-only unpickler. Objects that unpickler refuses (mmengine's
  HistoryBuffer, numpy scalars in a Runner checkpoint's ``meta``) are mapped, for this one
  load, to inert ``Placeholder`` classes, or to real classes the caller names in
  ``trusted``. torch's unpickler lets BUILD touch only instances of allow-listed classes
  that the load itself created, SETITEM only exact dicts and APPEND only lists, so a file
  cannot set attributes on a function or class of the process. Legacy (pre-zip) files are
  refused: torch's legacy loader extracts tar archives to a temporary folder, and no legacy
  file is needed for this model.

- ``load_dcp_metadata``: the ``.metadata`` pickle of a torch.distributed.checkpoint folder
  (torch reads it with plain ``pickle.load``), through a restricted unpickler that maps the
  few classes DCP writes onto this module's own inert ``Record`` objects (so not even DCP's
  ``__setstate__`` code runs), torch.Size and dtypes onto themselves, and refuses any
  other global and every state-changing opcode on objects the load did not create.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import reprlib
import tarfile
import threading
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from dataclasses import dataclass, field as dc_field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

MAX_DEPTH = 100  # nesting a checkpoint never needs; C recursion on deeper values can crash
MAX_TREE = 1_000_000  # expanded size of a hashable value (tuples count their shared parts again)
MAX_PICKLE_BYTES = 1 << 28  # a pickle this large is not a state dict's table of contents


class UnsafeFileError(pickle.UnpicklingError):
    """A pickle that asks for something a data file never needs (a refused global or opcode)."""


_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxtuple, _brief.maxlist, _brief.maxdict, _brief.maxstring, _brief.maxother = 3, 4, 4, 4, 60, 60


def brief(obj) -> str:
    """A bounded description of something a file holds (for error messages: a file's values
    can be exponentially expensive to print in full)."""
    return _brief.repr(obj)


# --- the scan -------------------------------------------------------------------------------------

class _Abs:
    """What the scan knows of a value: how deep it nests, its expanded size, and for ints,
    short strings, tuples of such, globals and storages, the value itself (``known``)."""
    __slots__ = ("kind", "depth", "tree", "value", "known", "parts")

    def __init__(self, kind: str, value=None, known: bool = False, depth: int = 0):
        self.kind, self.value, self.known, self.depth, self.tree, self.parts = kind, value, known, depth, 1, None


@dataclass
class TensorCall:
    """A tensor the pickle rebuilds from a storage: what the scan read off its arguments."""
    dtype: torch.dtype
    key: str
    numel: int  # the storage's elements
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int


@dataclass
class ScanResult:
    globals: List[str] = dc_field(default_factory=list)
    storages: Dict[str, Tuple[torch.dtype, int]] = dc_field(default_factory=dict)  # key -> (dtype, numel)
    tensors: List[TensorCall] = dc_field(default_factory=list)


def _storage_dtypes() -> Dict[str, torch.dtype]:
    """torch.FloatStorage -> float32, ...: how torch.save names a storage's element type."""
    return {f"torch.{cls.__name__ if isinstance(cls, type) else cls}": dtype
            for dtype, cls in torch.storage._dtype_to_storage_type_map().items()}


_TENSOR_REBUILDS = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                    "torch._utils._rebuild_qtensor"}
# torch allow-lists these too; a checkpoint of this model never holds them.
_REFUSED_CALLS = {"torch._utils._rebuild_wrapper_subclass", "torch._utils._rebuild_nested_tensor",
                  "torch._utils._rebuild_device_tensor_from_numpy", "torch._utils._rebuild_device_tensor_from_cpu_tensor",
                  "builtins.bytearray"}
_ATOMS = {"NEWTRUE": True, "NEWFALSE": False, "NONE": None}
_INTS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4")
_STRS = ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8")
_REFUSED_OPS = ("PERSID", "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "BYTEARRAY8", "NEXT_BUFFER",
                "READONLY_BUFFER")


class _Scanner:
    def __init__(self, allowed: Callable[[str], bool], storages: bool):
        self.allowed, self.storages = allowed, storages
        self.dtypes = _storage_dtypes() if storages else {}
        self.stack: list = []
        self.marks: List[int] = []
        self.memo: Dict[int, _Abs] = {}
        self.res = ScanResult()

    def pop(self) -> _Abs:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise UnsafeFileError("pickle: takes from an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise UnsafeFileError("pickle: a mark is missing")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    @staticmethod
    def grow(a: _Abs, items) -> _Abs:
        for i in items:
            a.depth = max(a.depth, i.depth + 1)
            a.tree += i.tree
        if a.depth > MAX_DEPTH:
            raise UnsafeFileError(f"pickle: values nest deeper than {MAX_DEPTH}")
        if a.kind in ("tuple", "frozenset") and a.tree > MAX_TREE:
            raise UnsafeFileError(f"pickle: a value expands to more than {MAX_TREE} parts")
        return a

    def tuple(self, items) -> _Abs:
        known = all(i.known for i in items)
        t = self.grow(_Abs("tuple", tuple(i.value for i in items) if known else None, known), items)
        t.parts = items
        return t

    def call(self, func: _Abs, args: _Abs) -> _Abs:
        if func.kind != "global":
            raise UnsafeFileError("pickle: calls something that is not a named global")
        name = func.value
        if name in _REFUSED_CALLS:
            raise UnsafeFileError(f"pickle: refused call of {name}")
        argv = args.value if args.known else None
        if name == "_codecs.encode":
            if not argv or len(argv) != 2 or argv[1] not in ("latin1", "latin-1") or not isinstance(argv[0], str):
                raise UnsafeFileError("pickle: _codecs.encode is only accepted as protocol 2's latin-1 bytes")
            return self.grow(_Abs("bytes"), [args])
        if name in _TENSOR_REBUILDS:
            return self.tensor(name, args)
        if name.endswith("multiarray._reconstruct") and (not args.parts or len(args.parts) != 3
                                                         or args.parts[1].value != (0,)):
            raise UnsafeFileError("pickle: a numpy array that does not start empty")
        return self.grow(_Abs("obj"), [args])

    def tensor(self, name: str, args: _Abs) -> _Abs:
        parts = args.parts
        if not parts or len(parts) < 4 or parts[0].kind != "storage":
            raise UnsafeFileError(f"pickle: {name} without a storage")
        dtype, key, numel = parts[0].value
        offset, size, stride = parts[1].value, parts[2].value, parts[3].value
        ints = all(isinstance(v, tuple) and all(type(i) is int and i >= 0 for i in v) for v in (size, stride))
        if type(offset) is not int or offset < 0 or not ints or len(size) != len(stride):
            raise UnsafeFileError(f"pickle: {name} with an unreadable offset, size or stride")
        if all(n > 0 for n in size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
            raise UnsafeFileError(f"pickle: a tensor of size {brief(size)} reaches past its storage of "
                                  f"{numel} elements")
        self.res.tensors.append(TensorCall(dtype, key, numel, size, stride, offset))
        return self.grow(_Abs("tensor"), [args])

    def persistent(self, pid: _Abs) -> _Abs:
        p = pid.parts
        ok = (self.storages and p is not None and len(p) == 5 and p[0].value == "storage" and p[1].kind == "global"
              and p[1].value in self.dtypes and p[2].known and isinstance(p[2].value, str)
              and p[4].known and type(p[4].value) is int and p[4].value >= 0)
        if not ok:
            untyped = ("torch.UntypedStorage", "torch.storage.UntypedStorage")
            if p is not None and len(p) == 5 and p[1].kind == "global" and p[1].value in untyped:
                # torch.save writes e4m3 (and other new dtypes') storages untyped: no dtype to check
                raise UnsafeFileError("pickle: an untyped storage (torch.save writes FP8 tensors so); "
                                      "save FP8 weights with safetensors")
            raise UnsafeFileError("pickle: a persistent id that is not one of torch's storages")
        dtype, key, numel = self.dtypes[p[1].value], p[2].value, p[4].value
        if self.res.storages.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise UnsafeFileError(f"pickle: storage {brief(key)} declared twice, differently")
        return _Abs("storage", (dtype, key, numel), True)

    def op(self, name: str, arg) -> None:
        st = self.stack
        if name in _INTS:
            st.append(_Abs("int", arg, type(arg) is int))
        elif name in _ATOMS:
            st.append(_Abs("atom", _ATOMS[name], True))
        elif name in ("FLOAT", "BINFLOAT"):
            st.append(_Abs("atom", arg, True))
        elif name in _STRS:
            short = isinstance(arg, str) and len(arg) <= 4096
            st.append(_Abs("str", arg if short else None, short))
        elif name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
            st.append(_Abs("bytes"))
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
            st.append(_Abs(name[6:].lower(), depth=1))
        elif name == "EMPTY_TUPLE":
            st.append(self.tuple([]))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            st.append(self.tuple([self.pop() for _ in range(int(name[-1]))][::-1]))
        elif name == "TUPLE":
            st.append(self.tuple(self.pop_mark()))
        elif name in ("LIST", "DICT", "FROZENSET"):
            st.append(self.grow(_Abs(name.lower(), depth=1), self.pop_mark()))
        elif name in ("APPEND", "SETITEM"):
            items = [self.pop() for _ in range(1 if name == "APPEND" else 2)]
            st.append(self.grow(self.pop(), items))
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            items = self.pop_mark()
            st.append(self.grow(self.pop(), items))
        elif name == "MARK":
            self.marks.append(len(st))
        elif name == "POP":
            self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            top = self.pop()
            st += [top, top]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not st:
                raise UnsafeFileError("pickle: memoizes an empty stack")
            self.memo[len(self.memo) if name == "MEMOIZE" else int(arg)] = st[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in self.memo:
                raise UnsafeFileError("pickle: reads a memo entry it never wrote")
            st.append(self.memo[int(arg)])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attr = arg.partition(" ")
            else:
                a, m = self.pop(), self.pop()
                module, attr = m.value, a.value
                if not (m.known and a.known and isinstance(module, str) and isinstance(attr, str)):
                    raise UnsafeFileError("pickle: a global named by values that are not strings")
            # Python 2 names, mapped as torch's unpickler (and pickle's fix_imports) map them
            if (module, attr) in NAME_MAPPING:
                module, attr = NAME_MAPPING[module, attr]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
            full = f"{module}.{attr}"
            if not self.allowed(full):
                raise UnsafeFileError(f"pickle: refused global {brief(full)}")
            self.res.globals.append(full)
            st.append(_Abs("global", full, False))
        elif name == "REDUCE":
            args, func = self.pop(), self.pop()
            st.append(self.call(func, args))
        elif name == "NEWOBJ":
            args, cls = self.pop(), self.pop()
            if cls.kind != "global":
                raise UnsafeFileError("pickle: builds an object of something that is not a named class")
            st.append(self.grow(_Abs("obj"), [args]))
        elif name == "BUILD":
            state, inst = self.pop(), self.pop()
            st.append(self.grow(inst, [state]))
        elif name == "BINPERSID":
            st.append(self.persistent(self.pop()))
        else:  # _REFUSED_OPS and anything newer
            raise UnsafeFileError(f"pickle: refused opcode {name}")


def scan(data: bytes, allowed: Callable[[str], bool], storages: bool = False) -> ScanResult:
    """Walk a pickle's opcodes with an abstract stack; raise UnsafeFileError on anything the
    module docstring lists, before any object is built. ``allowed(name)``: whether a global
    may be named; ``storages``: torch's persistent ids of storages are expected."""
    if len(data) > MAX_PICKLE_BYTES:
        raise UnsafeFileError(f"a pickle of {len(data)} bytes is larger than any table of contents needs")
    scanner = _Scanner(allowed, storages)
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "STOP":
                return scanner.res
            if op.name not in ("PROTO", "FRAME"):
                scanner.op(op.name, arg)
    except UnsafeFileError:
        raise
    except Exception as e:  # noqa: BLE001 - genops on a truncated or malformed pickle
        raise UnsafeFileError(f"pickle: malformed ({type(e).__name__}: {str(e)[:120]})") from None
    raise UnsafeFileError("pickle: ends without STOP")


# --- torch.save files -----------------------------------------------------------------------

class Placeholder:
    """Stands in for an object a checkpoint pickles that is not tensor data. Built without
    running any of the file's code; keeps nothing. ``name`` says what it replaced."""

    name = "?"
    __slots__ = ()

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return f"<skipped {self.name}>"


def _placeholder_for(name: str) -> type:
    # One class per name, created for one load: what a value was stays visible in its repr.
    return type("Placeholder", (Placeholder,), {"name": name, "__module__": __name__, "__slots__": ()})


class FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of a file, as a file (a DCP chunk is a torch.save zip)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = max(0, min(self.length, (0, self.pos, self.length)[whence] + pos))
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def check_torch_zip(fileobj, allowed: Callable[[str], bool]) -> ScanResult:
    """The structure of a torch.save zip (before torch reads it): entries stored
    uncompressed, as torch.save writes them (a compressed entry could be a decompression
    bomb); its data.pkl scanned; every storage it names present, as long as the storage."""
    try:
        zf = zipfile.ZipFile(fileobj)
        infos = zf.infolist()
    except Exception as e:  # noqa: BLE001 - BadZipFile, truncated directories
        raise UnsafeFileError(f"not a readable zip archive ({type(e).__name__}: {str(e)[:120]})") from None
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise UnsafeFileError("a compressed zip entry: torch.save stores entries uncompressed")
    pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pkl) != 1:
        raise UnsafeFileError("not a torch.save archive (no single <name>/data.pkl)")
    prefix = pkl[0].filename[:-len("data.pkl")]
    if pkl[0].file_size > MAX_PICKLE_BYTES:
        raise UnsafeFileError(f"a data.pkl of {pkl[0].file_size} bytes")
    res = scan(zf.read(pkl[0]), allowed, storages=True)
    sizes = {i.filename: i.file_size for i in infos}
    for key, (dtype, numel) in res.storages.items():
        need = numel * torch.empty(0, dtype=dtype).element_size()
        have = sizes.get(f"{prefix}data/{key}")
        if have is None or have < need:
            raise UnsafeFileError(f"storage {brief(key)} needs {need} bytes; the archive holds {have}")
    return res


def is_zip_checkpoint(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _any_name(name: str) -> bool:
    # A torch.save file may name anything: a name outside torch's allow-list and the caller's
    # trusted classes becomes an inert placeholder (torch itself refuses os, sys, ...).
    return True


# torch's safe-globals list is process-wide: our loads take turns, so one load's placeholder
# names are never another's. (A weights-only torch.load in another thread during our load would
# see them too, as inert placeholders.)
_SAFE_GLOBALS_LOCK = threading.Lock()


def load_torch_file(path: str, trusted: Optional[Mapping[str, object]] = None, mmap: bool = True
                    ) -> Tuple[object, List[str]]:
    """A torch.save zip file, scanned, then read by torch's weights-only unpickler, with
    every global it refuses replaced by an inert placeholder (or by ``trusted[name]``).

    Returns (object, names replaced by placeholders). Never unpickles without restriction."""
    trusted = dict(trusted or {})
    if not is_zip_checkpoint(path):
        kind = "a tar archive" if tarfile.is_tarfile(path) else "not a zip archive"
        raise UnsafeFileError(f"{kind}: only torch.save's zip format is read (torch >= 1.6 writes it; re-save "
                              "an older file with a current torch)")
    with open(path, "rb") as f:
        res = check_torch_zip(f, _any_name)
    from torch import _weights_only_unpickler as wo
    # torch's own allow-list, and what the user allow-listed with torch.serialization.add_safe_globals
    default = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    skipped = sorted({n for n in res.globals if n not in default and n not in trusted})
    # Every trusted class, named in the file or not: torch's unpickler applies BUILD only to
    # instances of allow-listed classes (numpy's dtype objects are instances of classes the
    # file never names).
    extra = [(obj, n) for n, obj in trusted.items()] + [(_placeholder_for(n), n) for n in skipped]
    with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(extra):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), skipped


def load_torch_bytes(data: bytes) -> torch.Tensor:
    """One tensor saved with torch.save, from bytes (a DCP chunk), scanned first."""
    check_torch_zip(io.BytesIO(data), lambda name: name in tensor_globals())
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def tensor_globals() -> set:
    from torch import _weights_only_unpickler as wo
    return set(wo._get_allowed_globals())


# --- torch.distributed.checkpoint metadata ----------------------------------------------------

class Record:
    """An object DCP pickled (Metadata, TensorStorageMetadata, ...), as plain fields.

    ``kind`` is the class name it was pickled as; fields come from the pickled state (a dict
    for dataclasses, a tuple for TensorProperties, stored as ``state``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.state: tuple = ()

    def __repr__(self) -> str:  # bounded: a file's values may be costly to print
        return f"Record({self.kind})"


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


def _layout_name(name):
    if not isinstance(name, str) or len(name) > 64:
        raise UnsafeFileError("a layout that is not a short name")
    return name


def _enum_value(value):
    if type(value) is not int:
        raise UnsafeFileError("an enum value that is not an int")
    return value


def _join_path(*parts) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise UnsafeFileError("a path made of values that are not strings")
    return "/".join(parts)


def _size(dims=()):
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise UnsafeFileError("a torch.Size of values that are not ints")
    return torch.Size(dims)


def _dcp_globals() -> Dict[str, object]:
    allowed: Dict[str, object] = {name: _RecordClass(name.rsplit(".", 1)[1]) for name in _DCP_RECORDS}
    allowed["torch.Size"] = _size
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    # Values whose meaning the reader does not need, read as plain values by this module's
    # own functions (no torch, codec or pathlib code runs): the layout's name, the
    # memory-format enum, the folder's path.
    allowed["torch.serialization._get_layout"] = _layout_name
    allowed["torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING"] = _enum_value
    for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        allowed[f"pathlib.{cls}"] = _join_path
    return allowed


_CALLABLE = (_size, _layout_name, _enum_value, _join_path)


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
            raise UnsafeFileError(f"refused NEWOBJ of {brief(cls)}")
        rec = Record(cls.kind)
        self._made.add(id(rec))
        self._keep.append(rec)
        self.append(rec)

    def _reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is c for c in _CALLABLE):
            raise UnsafeFileError(f"refused call of {brief(func)}")
        try:
            self.stack[-1] = func(*args)
        except TypeError:  # arguments these functions do not take
            raise UnsafeFileError(f"refused call of {func.__name__} with these arguments") from None

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
                    raise UnsafeFileError(f"refused field {brief(k)}")
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
    names = _dcp_globals()
    scan(data, lambda name: name in names)
    obj = _DcpUnpickler(io.BytesIO(data)).load()
    if type(obj) is not Record or obj.kind != "Metadata":
        raise UnsafeFileError(f"expected DCP Metadata, found {type(obj).__name__}")
    return obj


def field(rec: object, name: str, kind: Optional[str] = None, default=None):
    """A field of a Record, checked to be one (of ``kind``) when it must be."""
    if type(rec) is not Record or (kind is not None and rec.kind != kind):
        raise UnsafeFileError(f"expected a {kind or 'record'}, found {brief(rec)}")
    return rec.__dict__.get(name, default)
