"""Checkpoint files written by an attacker: loading them may fail, but never runs code,
writes a file or changes the process beyond the model loaded into.

Every payload here, if it ran, would create a marker file in the test's temp folder (or
set a marker attribute on one of torch's functions); each test asserts that it did not,
and that the loader answered with a CheckpointError (an Exception) naming the file.
"""
import io
import json
import logging
import os
import pickle
import struct
import zipfile

import pytest
import torch

from helpers import small_model
from internvit_fast import load_checkpoint
from internvit_fast.checkpoint import CheckpointError, read_state_dict, to_upstream_keys


def _fresh(**kw):
    return small_model(dtype=torch.float32, **kw)


class _Payload:
    """Unpickled without restriction, this opens (creates) the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _torch_zip_with_pickle(path, data_pkl: bytes):
    """A torch.save zip file whose data.pkl is ``data_pkl`` (the rest from a real save)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)


def _binunicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _build_on_global(module: str, name: str, attr: str) -> bytes:
    """Protocol-2 pickle of {"x": <module.name>} that on the way applies BUILD with slot
    state {attr: True} to the global itself (setattr on a function or class of torch)."""
    return (b"\x80\x02}(" + _binunicode("x") + f"c{module}\n{name}\n".encode()
            + b"N}" + _binunicode(attr) + b"\x88s\x86b" + b"u.")


# --- torch.save files -------------------------------------------------------------------------

@pytest.mark.parametrize("target", [("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
                                    ("torch", "Size")])
def test_build_on_a_global_is_refused_and_changes_nothing(tmp_path, target):
    path = tmp_path / "rewrite_torch.pth"
    _torch_zip_with_pickle(path, _build_on_global(*target, "internvit_pwned"))
    with pytest.raises(CheckpointError, match="rewrite_torch.pth"):
        load_checkpoint(_fresh(), path)
    obj = getattr(__import__(target[0], fromlist=[target[1]]), target[1])
    assert not hasattr(obj, "internvit_pwned"), "a file set an attribute on a global of the process"
    # and later loads of clean files, by torch itself too, give the saved weights
    src = _fresh()
    torch.save(src.state_dict(), tmp_path / "clean.pth")
    assert torch.equal(torch.load(tmp_path / "clean.pth", weights_only=True)["cls_token"], src.cls_token)


def test_build_on_a_placeholder_class_is_refused(tmp_path):
    path = tmp_path / "p.pth"
    _torch_zip_with_pickle(path, _build_on_global("mmengine.fake", "Thing", "internvit_pwned"))
    with pytest.raises(CheckpointError, match="(?i)build"):
        load_checkpoint(_fresh(), path)
    from internvit_fast import checkpoint
    from internvit_fast.checkpoint import safe_pickle
    classes = [c for m in (checkpoint, safe_pickle) for c in vars(m).values() if isinstance(c, type)]
    assert not [c for c in classes if hasattr(c, "internvit_pwned")], "a file set an attribute on a class"


def test_pickled_call_in_a_torch_file_does_not_run(tmp_path, caplog):
    src, dst = _fresh(), _fresh()
    marker = tmp_path / "marker"
    torch.save({"state_dict": src.state_dict(), "meta": {"x": _Payload(marker)}}, tmp_path / "c.pth")
    with caplog.at_level(logging.INFO, logger="internvit_fast"):
        load_checkpoint(dst, tmp_path / "c.pth")
    assert not marker.exists()
    assert _same_weights(src, dst)
    assert "open" in caplog.text  # the skipped object is named in the log


def test_pickled_call_in_place_of_a_tensor_is_refused(tmp_path):
    dst = _fresh()
    before = _snapshot(dst)
    sd = dict(_fresh().state_dict())
    marker = tmp_path / "marker"
    sd["blocks.0.norm1.weight"] = _Payload(marker)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint(dst, tmp_path / "c.pth")
    assert not marker.exists() and _unchanged(dst, before)


def test_legacy_files_are_refused_without_being_read(tmp_path):
    """Pre-zip torch files: torch's legacy loader extracts tar archives into a temporary folder
    and, unrestricted, writes "patch" files; no file of this model needs it."""
    import tarfile
    src = _fresh()
    torch.save(src.state_dict(), tmp_path / "plain.pth", _use_new_zipfile_serialization=False)
    marker = tmp_path / "marker"
    torch.save({"state_dict": src.state_dict(), "x": _Payload(marker)}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    with tarfile.open(tmp_path / "archive.pth", "w") as tar:
        (tmp_path / "storages").write_bytes(b"")
        tar.add(tmp_path / "storages", arcname="storages")
    (tmp_path / "storages").unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    import tempfile
    made = []
    real = tempfile.mkdtemp
    tempfile.mkdtemp = lambda *a, **k: made.append(1) or real(*a, **k)
    try:
        for name, what in (("plain.pth", "not a zip archive"), ("legacy.pth", "not a zip archive"),
                           ("archive.pth", "a tar archive")):
            with pytest.raises(CheckpointError, match=f"{name}.*{what}.*re-save"):
                load_checkpoint(_fresh(), tmp_path / name)
    finally:
        tempfile.mkdtemp = real
    assert not marker.exists() and not made, "a legacy loader ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a file was written"


def test_loader_never_unpickles_without_restriction(tmp_path, monkeypatch):
    """Whatever the file, torch.load is only ever asked for weights_only=True."""
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real(*a, **kw)
    monkeypatch.setattr(torch, "load", spy)
    src = _fresh()
    torch.save({"state_dict": src.state_dict(), "meta": {"x": _Payload(tmp_path / "m")}}, tmp_path / "a.pth")
    load_checkpoint(_fresh(), tmp_path / "a.pth")
    folder = tmp_path / "dcp"
    _dcp_save(src.state_dict(), folder)
    load_checkpoint(_fresh(), folder)
    assert calls and all(c is True for c in calls), calls


class _Wrapper(torch.Tensor):
    """A wrapper tensor subclass (like DTensor): a tensor object without storage."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a wrapper tensor from a file")


class _Sub(torch.Tensor):
    pass


def _wrapper_subclass_file(path):
    # {"cls_token": torch._utils._rebuild_wrapper_subclass(_Wrapper, float32, (1, 1, 96), ...)},
    # what torch's allow-list builds for DTensor and nested tensors once they are imported.
    layout = b"ctorch.serialization\n_get_layout\n" + _binunicode("torch.strided") + b"\x85R"
    device = b"ctorch\ndevice\n" + _binunicode("cpu") + b"\x85R"
    args = (f"(c{__name__}\n_Wrapper\n".encode() + b"ctorch\nfloat32\n" + b"K\x01K\x01K`\x87" + b"K`K`K\x01\x87"
            + b"K\x00" + layout + device + b"\x89t")
    data = b"\x80\x02}(" + _binunicode("cls_token") + b"ctorch._utils\n_rebuild_wrapper_subclass\n" + args + \
        b"Ru."
    _torch_zip_with_pickle(path, data)


@pytest.mark.parametrize("cls", [_Wrapper, _Sub])
def test_tensor_subclass_is_a_checkpoint_error(tmp_path, cls):
    """Even a subclass the user allow-listed (as torch does for DTensor once it is imported)."""
    path = tmp_path / "s.pth"
    if cls is _Wrapper:
        _wrapper_subclass_file(path)
    else:
        sd = dict(_fresh().state_dict())
        sd["cls_token"] = sd["cls_token"].as_subclass(_Sub)
        torch.save(sd, path)
    dst = _fresh()
    before = _snapshot(dst)
    with torch.serialization.safe_globals([cls]):
        assert type(torch.load(path, weights_only=True)["cls_token"]) is cls  # what the file holds
        with pytest.raises(CheckpointError, match="cls_token.*subclass|refused call of torch._utils._rebuild_wrapper"):
            load_checkpoint(dst, path, strict=False)
    assert _unchanged(dst, before)


# --- torch.distributed.checkpoint folders -------------------------------------------------------

def _dcp_save(state, folder):
    import torch.distributed.checkpoint as dcp
    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def test_dcp_folder_round_trip(tmp_path):
    src, dst = _fresh(), _fresh()
    _dcp_save(src.state_dict(), tmp_path / "ck")
    load_checkpoint(dst, tmp_path / "ck")
    assert _same_weights(src, dst)


def test_dcp_pickled_object_beside_the_weights_is_skipped(tmp_path, caplog):
    src, dst = _fresh(), _fresh()
    marker = tmp_path / "marker"
    _dcp_save(dict(src.state_dict(), evil=_Payload(marker), step=3), tmp_path / "ck")
    with caplog.at_level(logging.INFO, logger="internvit_fast"):
        load_checkpoint(dst, tmp_path / "ck", strict=False)
    assert not marker.exists(), "a pickled object in a DCP folder ran"
    assert _same_weights(src, dst)
    assert "skipped" in caplog.text and "evil" in caplog.text


def test_dcp_crafted_metadata_does_not_run(tmp_path):
    folder = tmp_path / "ck"
    _dcp_save(_fresh().state_dict(), folder)
    marker = tmp_path / "marker"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(_fresh(), folder)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_dcp_metadata_state_changes_on_globals_are_refused(tmp_path, protocol):
    """BUILD on an allowed global (torch.Size) and SETITEM on a non-container are refused."""
    from internvit_fast.checkpoint import safe_pickle
    build = b"\x80\x02ctorch\nSize\nN}" + _binunicode("pwned") + b"\x88s\x86b."
    with pytest.raises(safe_pickle.UnsafeFileError, match="BUILD"):
        safe_pickle.load_dcp_metadata(build)
    assert not hasattr(torch.Size, "pwned")
    setitem = b"\x80\x02ctorch\nSize\n" + _binunicode("k") + b"K\x01s."
    with pytest.raises(safe_pickle.UnsafeFileError, match="item assignment"):
        safe_pickle.load_dcp_metadata(setitem)
    with pytest.raises(safe_pickle.UnsafeFileError, match="refused global"):
        safe_pickle.load_dcp_metadata(pickle.dumps(_Payload(tmp_path / "m"), protocol=protocol))
    assert not (tmp_path / "m").exists()


def test_dcp_metadata_reader_reads_what_dcp_writes(tmp_path):
    """The restricted reader gives the same entries as DCP's own (unrestricted) reader would."""
    from internvit_fast.checkpoint import safe_pickle
    state = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": {"n": 1}}
    _dcp_save(state, tmp_path / "ck")
    meta = safe_pickle.load_dcp_metadata((tmp_path / "ck" / ".metadata").read_bytes())
    entries = meta.state_dict_metadata
    assert sorted(entries) == ["a", "b", "c.n"]
    assert entries["c.n"].kind == "BytesStorageMetadata"
    assert tuple(entries["a"].size) == (3, 4) and entries["b"].properties.state[0] == torch.bfloat16
    got = read_state_dict(tmp_path / "ck")
    assert torch.equal(got["a"].load(), state["a"]) and torch.equal(got["b"].load(), state["b"])


def test_dcp_truncated_metadata_is_a_checkpoint_error(tmp_path):
    folder = tmp_path / "ck"
    _dcp_save(_fresh().state_dict(), folder)
    data = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(data[: len(data) // 2])
    try:
        load_checkpoint(_fresh(), folder)
    except Exception as e:  # noqa: BLE001 - what a caller catches: it must be an Exception
        assert isinstance(e, CheckpointError) and ".metadata" in str(e)
    else:
        pytest.fail("a truncated metadata file loaded")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_dcp_damaged_shard_is_a_checkpoint_error_before_any_copy(tmp_path, damage):
    folder = tmp_path / "ck"
    _dcp_save(_fresh().state_dict(), folder)
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    dst = _fresh()
    before = _snapshot(dst)
    with pytest.raises(CheckpointError, match=shard.name if damage == "missing" else "truncated"):
        load_checkpoint(dst, folder)
    assert _unchanged(dst, before)


@pytest.mark.parametrize("name", ["../{}", "/tmp/{}", "sub/../../{}"])
def test_dcp_metadata_naming_a_file_outside_the_folder_is_refused(tmp_path, name):
    folder = tmp_path / "ck"
    _dcp_save(_fresh().state_dict(), folder)
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    meta = pickle.loads((folder / ".metadata").read_bytes())  # the test's own file: trusted here
    for info in meta.storage_data.values():
        info.relative_path = name.format(shard.name)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    shard.rename(tmp_path / shard.name)  # the data now only exists one level up
    with pytest.raises(CheckpointError, match="outside its folder"):
        load_checkpoint(_fresh(), folder)


# --- sharded sets --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, name):
    from safetensors.torch import save_file
    folder = tmp_path / "set"
    folder.mkdir()
    save_file(_fresh().state_dict(), str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"cls_token": name}}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        load_checkpoint(_fresh(), folder / "model.safetensors.index.json", strict=False)


def test_index_naming_a_link_out_of_its_folder_is_refused(tmp_path):
    from safetensors.torch import save_file
    folder = tmp_path / "set"
    folder.mkdir()
    save_file(_fresh().state_dict(), str(tmp_path / "outside.safetensors"))
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"cls_token": "link.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        load_checkpoint(_fresh(), folder / "model.safetensors.index.json", strict=False)


# --- prefix detection on a file with very many prefixes ----------------------------------------------

def test_prefix_detection_is_linear_in_the_number_of_keys(monkeypatch):
    from internvit_fast.checkpoint import loader
    calls = []
    real = loader.upstream_name
    monkeypatch.setattr(loader, "upstream_name", lambda k: calls.append(1) or real(k))
    model = _fresh()
    own = model.state_dict()
    for n in (2000, 20000):
        calls.clear()
        sd = {f"p{i}.q{i}.x": torch.zeros(1) for i in range(n)}
        sd.update({"module." + k: v for k, v in own.items()})
        out, prefix = to_upstream_keys(sd, own)
        assert prefix == "module." and set(out) == set(own)
        assert len(calls) <= 3 * len(sd) + 10, (n, len(calls))


# --- files that try to take the process down (found by an independent review) -----------------

def _zip_pickle(path, data_pkl, compress=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w", compress) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_deeply_nested_values_are_refused_before_they_are_built(tmp_path, compress):
    # 200,000 nested 1-tuples as a dict key: hashing it recurses in C and kills the interpreter
    _zip_pickle(tmp_path / "deep.pth", b"\x80\x02})" + b"\x85" * 200_000 + b"K\x01s.", compress)
    with pytest.raises(CheckpointError, match="deeper than|compressed"):
        load_checkpoint(_fresh(), tmp_path / "deep.pth")
    from internvit_fast.checkpoint import safe_pickle
    with pytest.raises(safe_pickle.UnsafeFileError, match="deeper than"):
        safe_pickle.load_dcp_metadata(b"\x80\x02)" + b"\x85" * 200_000 + b".")


def test_a_memoized_dag_of_tuples_is_refused_before_it_is_built(tmp_path):
    # t(i+1) = (t(i), t(i)) through the memo: 24 levels are 2^24 parts to hash, compare or print
    dag = b"\x80\x02)q\x00" + b"h\x00h\x00\x86q\x00" * 24 + b"."
    from internvit_fast.checkpoint import safe_pickle
    with pytest.raises(safe_pickle.UnsafeFileError, match="expands to more than"):
        safe_pickle.load_dcp_metadata(dag)
    _zip_pickle(tmp_path / "dag.pth", b"\x80\x02}" + dag[2:-1] + b"K\x01s.")
    with pytest.raises(CheckpointError, match="expands to more than"):
        load_checkpoint(_fresh(), tmp_path / "dag.pth")


def test_allocations_the_file_does_not_hold_are_refused(tmp_path):
    one = b"cbuiltins\nbytearray\nJ" + struct.pack("<i", 1 << 30) + b"\x85R"  # 1 GB from 30 bytes
    _zip_pickle(tmp_path / "b.pth", b"\x80\x02(" + one * 3 + b"t.")
    with pytest.raises(CheckpointError, match="bytearray"):
        load_checkpoint(_fresh(), tmp_path / "b.pth")
    # a tensor whose size reaches past its storage (torch would grow the storage to fit)
    buf = io.BytesIO()
    torch.save({"cls_token": torch.zeros(1, 1, 96)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        name = [n for n in z.namelist() if n.endswith("data.pkl")][0]
        pkl = z.read(name)
    grown = pkl.replace(b"K\x01K\x01K`\x87", b"K\x01K\x01J" + struct.pack("<i", 1 << 30) + b"\x87", 1)
    assert grown != pkl
    _zip_pickle(tmp_path / "grow.pth", grown)
    with pytest.raises(CheckpointError, match="reaches past its storage"):
        load_checkpoint(_fresh(), tmp_path / "grow.pth", strict=False)


@pytest.mark.parametrize("codec", ["koi8_u", "idna"])
def test_codecs_that_import_modules_are_refused(tmp_path, codec):
    import encodings
    import sys
    from internvit_fast.checkpoint import safe_pickle
    cached, modules = set(encodings._cache), set(sys.modules)
    _zip_pickle(tmp_path / "c.pth", b"\x80\x02c_codecs\nencode\n" + _binunicode("x") + _binunicode(codec) + b"\x86R.")
    with pytest.raises(CheckpointError, match="latin-1"):
        load_checkpoint(_fresh(), tmp_path / "c.pth")
    meta = b"\x80\x02ctorch.serialization\n_get_layout\nC\x01x" + _binunicode(codec) + b"\x86R."
    with pytest.raises(safe_pickle.UnsafeFileError):
        safe_pickle.load_dcp_metadata(meta)
    assert set(encodings._cache) == cached and set(sys.modules) == modules, "a file imported a module"


def _meta_of(folder):
    return pickle.loads((folder / ".metadata").read_bytes())  # the test's own file: trusted here


def _write_meta(folder, meta):
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def _dcp_folder(tmp_path):
    folder = tmp_path / "ck"
    _dcp_save(_fresh().state_dict(), folder)
    return folder


def test_dcp_chunk_holding_a_pickled_call_does_not_run(tmp_path):
    folder = _dcp_folder(tmp_path)
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(marker))
    meta = _meta_of(folder)
    (folder / "evil.distcp").write_bytes(payload)
    for index, info in meta.storage_data.items():
        if index.fqn == "cls_token":
            info.relative_path, info.offset, info.length = "evil.distcp", 0, len(payload)
    _write_meta(folder, meta)
    dst = _fresh()
    before = _snapshot(dst)
    with pytest.raises(CheckpointError, match="cls_token.*not a saved tensor"):
        load_checkpoint(dst, folder)
    assert not marker.exists() and _unchanged(dst, before)


def test_dcp_chunk_that_is_damaged_is_found_before_anything_is_copied(tmp_path):
    folder = _dcp_folder(tmp_path)
    meta = _meta_of(folder)
    last = max(meta.storage_data.values(), key=lambda i: i.offset)
    data = bytearray((folder / last.relative_path).read_bytes())
    data[last.offset:last.offset + last.length] = bytes(last.length)
    (folder / last.relative_path).write_bytes(bytes(data))
    dst = _fresh()
    before = _snapshot(dst)
    with pytest.raises(CheckpointError, match="not a saved tensor"):
        load_checkpoint(dst, folder)
    assert _unchanged(dst, before)


@pytest.mark.parametrize("damage, message", [
    ("no chunks", "do not cover"),
    ("overlap", "overlap"),
    ("outside", "lies outside"),
    ("negative", "non-negative"),
    ("bool", "non-negative"),
    ("wrong dtype", "expected one"),
    ("transforms", "transforms"),
])
def test_dcp_chunk_layout_is_checked(tmp_path, damage, message):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    folder = _dcp_folder(tmp_path)
    meta = _meta_of(folder)
    md = meta.state_dict_metadata["blocks.0.mlp.fc1.weight"]
    chunk = md.chunks[0]
    if damage == "no chunks":
        md.chunks = []
    elif damage == "overlap":
        md.chunks = [ChunkStorageMetadata(chunk.offsets, torch.Size([md.size[0] // 2 + 1, md.size[1]])),
                     ChunkStorageMetadata(torch.Size([md.size[0] // 2, 0]),
                                          torch.Size([md.size[0] - md.size[0] // 2 - 1, md.size[1]]))]
    elif damage == "outside":
        chunk.offsets = torch.Size([1, 0])
    elif damage in ("negative", "bool"):
        for index, info in meta.storage_data.items():
            if index.fqn == "blocks.0.mlp.fc1.weight":
                info.offset = -1 if damage == "negative" else True
    elif damage == "wrong dtype":
        md.properties.dtype = torch.float16
    elif damage == "transforms":
        for index, info in meta.storage_data.items():
            if index.fqn == "blocks.0.mlp.fc1.weight":
                info.transform_descriptors = ["zstd"]
    _write_meta(folder, meta)
    dst = _fresh()
    before = _snapshot(dst)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(dst, folder)
    assert _unchanged(dst, before)


def test_dcp_tensor_of_a_huge_declared_size_is_never_read(tmp_path, monkeypatch):
    """An expanded (stride 0) chunk can declare any size in 1.5 KB: the loader reads no tensor
    whose shape does not fit the model (a flat cls_token is reshaped only at the model's size)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata

    from internvit_fast.checkpoint import dcp
    folder = _dcp_folder(tmp_path)
    meta = _meta_of(folder)
    n = 1 << 29
    buf = io.BytesIO()
    torch.save(torch.zeros(1).expand(n), buf)
    (folder / "evil.distcp").write_bytes(buf.getvalue())
    meta.state_dict_metadata["cls_token"] = TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), torch.Size([n]), [ChunkStorageMetadata(torch.Size([0]), torch.Size([n]))])
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex
    for index in [i for i in meta.storage_data if i.fqn == "cls_token"]:
        del meta.storage_data[index]
    meta.storage_data[MetadataIndex("cls_token", torch.Size([0]), 0)] = _StorageInfo("evil.distcp", 0,
                                                                                     len(buf.getvalue()))
    _write_meta(folder, meta)
    reads = []
    real = dcp.StoredTensor.read
    monkeypatch.setattr(dcp.StoredTensor, "read", lambda self, *a: reads.append(self.fqn) or real(self, *a))
    with pytest.raises(CheckpointError, match="cls_token.*does not match"):
        load_checkpoint(_fresh(), folder)
    assert "cls_token" not in reads


def test_resized_tensors_far_larger_than_the_model_are_not_read(tmp_path):
    sd = dict(_fresh().state_dict())
    sd["patch_embed.proj.weight"] = torch.zeros(1, dtype=torch.bfloat16).expand(96, 3, 1400, 1400)
    torch.save(sd, tmp_path / "k.pth")
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight.*not resized"):
        load_checkpoint(_fresh(), tmp_path / "k.pth")


def _without_blocking(fn, seconds=20):
    import threading
    box = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the loader blocked"
    return box.get("error")


@pytest.mark.parametrize("what", ["metadata link", "metadata fifo", "metadata device", "weights link",
                                  "weights fifo", "shard fifo", "sibling link"])
def test_a_folder_cannot_point_reads_elsewhere_or_block(tmp_path, what):
    from safetensors.torch import save_file
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not yours")
    folder = tmp_path / "set"
    if what.startswith("metadata"):
        folder = _dcp_folder(tmp_path)
        (folder / ".metadata").unlink()
        if what == "metadata link":
            (folder / ".metadata").symlink_to(outside / "secret")
        elif what == "metadata fifo":
            os.mkfifo(folder / ".metadata")
        else:
            (folder / ".metadata").symlink_to("/dev/zero")
    else:
        folder.mkdir()
        if what == "weights link":
            save_file(_fresh().state_dict(), str(outside / "w.safetensors"))
            (folder / "model.safetensors").symlink_to(outside / "w.safetensors")
        elif what == "weights fifo":
            os.mkfifo(folder / "model.pth")
        elif what == "shard fifo":
            os.mkfifo(folder / "a.safetensors")
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"cls_token": "a.safetensors"}}))
        else:  # a link to a sibling folder whose name starts like this one's ("set" / "set_private")
            private = tmp_path / "set_private"
            private.mkdir()
            save_file(_fresh().state_dict(), str(private / "w.safetensors"))
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"cls_token": "link/w.safetensors"}}))
            (folder / "link").symlink_to(private)
    error = _without_blocking(lambda: load_checkpoint(_fresh(), folder, strict=False))
    assert isinstance(error, CheckpointError), error
    assert "not a regular file" in str(error) or "outside its folder" in str(error), error


def test_placeholders_keep_nothing_of_the_file(tmp_path):
    from internvit_fast.checkpoint import safe_pickle
    torch.save({"state_dict": {}, "x": _Stateful()}, tmp_path / "s.pth")
    obj, skipped = safe_pickle.load_torch_file(str(tmp_path / "s.pth"))
    assert skipped == [f"{__name__}._Stateful"]
    assert not hasattr(obj["x"], "__dict__") and not hasattr(obj["x"], "secret")


class _Stateful:
    def __init__(self):
        self.secret = "x" * 1000


@pytest.mark.parametrize("op", [b"i__main__\nX\n", b"o", b"\x82\x01", b"P1\n", b"Q", b"\x92", b"\x96"])
def test_dcp_metadata_refuses_opcodes_a_data_file_never_needs(op):
    from internvit_fast.checkpoint import safe_pickle
    with pytest.raises(safe_pickle.UnsafeFileError):
        safe_pickle.load_dcp_metadata(b"\x80\x04(" + op + b".")


@pytest.mark.parametrize("body", [
    b"cbuiltins\ngetattr\n",                                               # a global not on the list
    b"\x8c\x05torch\x94\x8c\x04Size\x94\x93)\x81.",                         # NEWOBJ of a non-record class
    b"ctorch\nfloat32\n)R.",                                               # calling a dtype
    b"ctorch\nSize\n)Ra.",                                                 # APPEND onto a torch.Size
    b"\x8f(K\x01\x90ctorch\nSize\n)R(K\x01\x90.",                           # ADDITEMS onto a non-set
])
def test_dcp_metadata_state_changes_and_calls_outside_the_list_are_refused(body):
    from internvit_fast.checkpoint import safe_pickle
    with pytest.raises(safe_pickle.UnsafeFileError):
        safe_pickle.load_dcp_metadata(b"\x80\x04" + body)


def test_many_empty_chunks_do_not_make_loading_quadratic(tmp_path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    folder = _dcp_folder(tmp_path)
    meta = _meta_of(folder)
    empty = ChunkStorageMetadata(torch.Size([0, 0, 0]), torch.Size([0, 0, 0]))
    meta.state_dict_metadata["cls_token"].chunks += [empty] * 20000
    _write_meta(folder, meta)
    error = _without_blocking(lambda: load_checkpoint(_fresh(), folder), seconds=60)
    assert error is None
