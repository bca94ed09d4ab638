"""Checkpoint round trips for every accepted format, with tensors the tests make."""
import json
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import SMALL, small_model
from internvit_fast import InternViT6B, load_checkpoint
from internvit_fast.checkpoint import CheckpointError


def _fresh(**kw):
    return small_model(dtype=torch.float32, **kw)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def internvl_layout(sd, prefix=""):
    """The InternViT (InternVL) key layout, written out independently of the loader."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            k = "embeddings.class_embedding"
        elif k == "pos_embed":
            k = "embeddings.position_embedding"
        elif k.startswith("patch_embed.proj."):
            k = "embeddings.patch_embedding." + k.split(".")[-1]
        elif re.match(r"blocks\.\d+\.ls[12]\.gamma", k):
            k = "encoder.layers." + k[len("blocks."):-len(".gamma")]
        else:
            k = "encoder.layers." + k[len("blocks."):]
        out[prefix + k] = v.clone()
    return out


@pytest.mark.parametrize("wrap", [None, "module", "model", "state_dict"])
def test_upstream_pth_round_trip(tmp_path, wrap):
    src, dst = _fresh(), _fresh()
    sd = src.state_dict()
    torch.save(sd if wrap is None else {wrap: sd, "meta": {"epoch": 3}}, tmp_path / "ckpt.pth")
    missing, unexpected = load_checkpoint(dst, tmp_path / "ckpt.pth")
    assert missing == unexpected == []
    assert_same_weights(src, dst)


def test_mmseg_segmentor_checkpoint_takes_backbone_only(tmp_path):
    src, dst = _fresh(), _fresh()
    sd = {"backbone." + k: v for k, v in src.state_dict().items()}
    sd["decode_head.conv_seg.weight"] = torch.randn(150, 8, 1, 1)
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "seg.pth")
    load_checkpoint(dst, str(tmp_path / "seg.pth"))
    assert_same_weights(src, dst)


@pytest.mark.parametrize("prefix", ["", "vision_model."])
@pytest.mark.parametrize("ext", [".pth", ".bin", ".safetensors"])
def test_internvl_layout_round_trip(tmp_path, prefix, ext):
    src, dst = _fresh(), _fresh()
    sd = internvl_layout(src.state_dict(), prefix)
    if prefix:
        sd["mlp1.0.weight"] = torch.randn(4, 4)  # the rest of an InternVL chat model
    path = str(tmp_path / f"model{ext}")
    save_file(sd, path) if ext == ".safetensors" else torch.save(sd, path)
    load_checkpoint(dst, path)
    assert_same_weights(src, dst)


@pytest.mark.parametrize("via", ["index", "folder"])
def test_sharded_safetensors(tmp_path, via):
    src, dst = _fresh(), _fresh()
    sd = internvl_layout(src.state_dict())
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    load_checkpoint(dst, str(index if via == "index" else tmp_path))
    assert_same_weights(src, dst)


def test_sharded_set_with_missing_shard_names_it(tmp_path):
    src = _fresh()
    sd = internvl_layout(src.state_dict())
    save_file(sd, str(tmp_path / "a.safetensors"))
    weight_map = {k: "a.safetensors" for k in sd}
    weight_map["embeddings.class_embedding"] = "b.safetensors"
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="b.safetensors"):
        load_checkpoint(_fresh(), str(tmp_path / "m.safetensors.index.json"))


def test_position_table_and_patch_kernel_resized_at_load(tmp_path):
    big = small_model(dtype=torch.float32, img_size=80, patch_size=16)  # 5x5 grid, 16px kernel
    sd = big.state_dict()
    dst = _fresh()  # 4x4 grid, 14px kernel
    torch.save(sd, tmp_path / "pre.pth")
    load_checkpoint(dst, tmp_path / "pre.pth")
    table = sd["pos_embed"]
    grid = table[:, 1:].reshape(1, 5, 5, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(dst.pos_embed[:, 1:], want)
    torch.testing.assert_close(dst.pos_embed[:, :1], table[:, :1])
    kern = F.interpolate(sd["patch_embed.proj.weight"], size=(14, 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(dst.patch_embed.proj.weight, kern)
    torch.testing.assert_close(dst.blocks[2].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"])


def test_pretrained_argument_loads(tmp_path):
    src = _fresh()
    torch.save(src.state_dict(), tmp_path / "p.pth")
    dst = InternViT6B(**dict(SMALL, dtype=torch.float32, pretrained=str(tmp_path / "p.pth")))
    assert_same_weights(src, dst)
    bf = InternViT6B(**dict(SMALL, pretrained=str(tmp_path / "p.pth")))  # converted to the model dtype
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight.bfloat16())


def test_missing_keys_raise_with_list_and_load_nothing(tmp_path):
    src, dst = _fresh(), _fresh()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    del sd["blocks.2.norm2.weight"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.2.norm2.weight'\]"):
        load_checkpoint(dst, tmp_path / "m.pth")
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the load failed"


def test_unexpected_keys_raise_or_are_logged(tmp_path, caplog):
    src, dst = _fresh(), _fresh(depth=3, out_indices=[2])  # a deeper checkpoint
    torch.save(src.state_dict(), tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match="unexpected keys.*blocks.3"):
        load_checkpoint(dst, tmp_path / "u.pth")
    with caplog.at_level(logging.WARNING, logger="internvit_fast"):
        missing, unexpected = load_checkpoint(dst, tmp_path / "u.pth", strict=False)
    assert missing == [] and unexpected and all(k.startswith("blocks.3.") for k in unexpected)
    assert "unexpected keys" in caplog.text and "blocks.3.attn.qkv.weight" in caplog.text
    torch.testing.assert_close(dst.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)


def test_missing_keys_logged_when_not_strict(tmp_path, caplog):
    src, dst = _fresh(), _fresh()
    sd = src.state_dict()
    del sd["cls_token"]
    torch.save(sd, tmp_path / "m.pth")
    with caplog.at_level(logging.WARNING, logger="internvit_fast"):
        missing, _ = load_checkpoint(dst, tmp_path / "m.pth", strict=False)
    assert missing == ["cls_token"] and "cls_token" in caplog.text


def test_wrong_shape_names_key(tmp_path):
    sd = _fresh().state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.randn(10, 96)
    torch.save(sd, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(10, 96\)"):
        load_checkpoint(_fresh(), tmp_path / "s.pth")


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_truncated_file_names_file(tmp_path, ext):
    sd = _fresh().state_dict()
    path = str(tmp_path / f"t{ext}")
    save_file(sd, path) if ext == ".safetensors" else torch.save(sd, path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(path)):
        load_checkpoint(_fresh(), path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\xff" * 64])
@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_corrupt_file_names_file(tmp_path, content, ext):
    path = str(tmp_path / f"c{ext}")
    open(path, "wb").write(content)
    with pytest.raises(CheckpointError, match=re.escape(path)):
        load_checkpoint(_fresh(), path)


def test_missing_file_names_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_checkpoint(_fresh(), tmp_path / "nope.pth")


def test_loaded_model_gives_source_outputs(tmp_path):
    src, dst = _fresh(), _fresh()
    save_file(internvl_layout(src.state_dict(), "vision_model."), str(tmp_path / "m.safetensors"))
    load_checkpoint(dst, str(tmp_path / "m.safetensors"))
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        for a, b in zip(src(img), dst(img)):
            assert torch.equal(a, b)


# --- every check before the first copy ---------------------------------------------------

def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad, msg", [
    ("meta", "meta tensor"),
    ("sparse", "layout torch.sparse_coo"),
    ("int", "dtype torch.int32"),
])
def test_bad_last_tensor_raises_before_anything_is_copied(tmp_path, bad, msg):
    src, dst = _fresh(), _fresh()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = dict(src.state_dict())
    last = sorted(sd)[-1]  # copied last: every other tensor would be in by then
    t = sd.pop(last)
    sd[last] = {"meta": lambda: torch.empty(t.shape, device="meta"), "sparse": lambda: t.to_sparse(),
                "int": lambda: t.int()}[bad]()
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=f"{re.escape(last)}.*{msg}"):
        load_checkpoint(dst, tmp_path / "bad.pth")
    assert _unchanged(dst, before)


def test_failure_during_the_copy_is_never_silent(tmp_path, monkeypatch):
    from internvit_fast.checkpoint import loader
    src, dst = _fresh(), _fresh()
    torch.save(src.state_dict(), tmp_path / "ok.pth")
    calls = []

    def failing(v):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk went away")
        return v
    monkeypatch.setattr(loader, "materialize", failing)
    with pytest.raises(CheckpointError, match="failed .*disk went away.* after 4 of .* mix of old and new"):
        load_checkpoint(dst, tmp_path / "ok.pth")


# --- mmengine checkpoints: loaded safely -------------------------------------------------

class _Payload:
    """A pickled object that would run code if unpickled without restriction."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_mmengine_checkpoint_loads_without_running_pickled_code(tmp_path, caplog):
    np = pytest.importorskip("numpy")
    src, dst = _fresh(), _fresh()
    extra = {"meta": {"epoch": 3, "iter": np.int64(1200), "seed": np.int64(7), "lr": np.float64(1e-4),
                      "dataset_meta": {"classes": ("wall", "sky")}, "hist": np.zeros(3)},
             "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
             "evil": _Payload(str(tmp_path / "pwned"))}
    try:  # what mmengine's Runner writes: its MessageHub state holds HistoryBuffer objects
        from mmengine.logging import MessageHub
        hub = MessageHub.get_instance("internvit_fast_test")
        hub.update_scalar("train/loss", np.float64(0.5))
        extra["message_hub"] = hub.state_dict()
    except ImportError:
        pass
    sd = {"backbone." + k: v for k, v in src.state_dict().items()}
    sd["decode_head.conv_seg.weight"] = torch.randn(5, 8, 1, 1)
    torch.save(dict(extra, state_dict=sd), tmp_path / "iter_1200.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "iter_1200.pth", weights_only=True)  # what plain loading does
    with caplog.at_level(logging.INFO, logger="internvit_fast"):
        load_checkpoint(dst, tmp_path / "iter_1200.pth")
    assert_same_weights(src, dst)
    assert not (tmp_path / "pwned").exists(), "a pickled call ran"
    assert "skipped pickled objects" in caplog.text and "io.open" in caplog.text


# --- prefixes: only when they are the file's structure --------------------------------------

@pytest.mark.parametrize("prefix", ["module.", "module.backbone.", "model.vision_model."])
def test_whole_file_prefixes_are_stripped(tmp_path, prefix, caplog):
    src, dst = _fresh(), _fresh()
    sd = src.state_dict() if "vision_model" not in prefix else internvl_layout(src.state_dict())
    torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "p.pth")
    with caplog.at_level(logging.INFO, logger="internvit_fast"):
        load_checkpoint(dst, tmp_path / "p.pth")
    assert_same_weights(src, dst)
    assert repr(prefix) in caplog.text


def test_one_stray_prefixed_key_does_not_drop_the_rest(tmp_path, caplog):
    src, dst = _fresh(), _fresh()
    sd = dict(src.state_dict())
    sd["backbone.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \[\], unexpected keys \['backbone.extra'\]"):
        load_checkpoint(dst, tmp_path / "s.pth")
    missing, unexpected = load_checkpoint(dst, tmp_path / "s.pth", strict=False)
    assert missing == [] and unexpected == ["backbone.extra"]
    assert_same_weights(src, dst)


# --- sharded .bin sets and malformed safetensors ---------------------------------------------

@pytest.mark.parametrize("via", ["index", "folder"])
def test_sharded_bin_set(tmp_path, via):
    src, dst = _fresh(), _fresh()
    sd = internvl_layout(src.state_dict(), "vision_model.")
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / name)
        weight_map.update({k: name for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    load_checkpoint(dst, str(tmp_path / "pytorch_model.bin.index.json" if via == "index" else tmp_path))
    assert_same_weights(src, dst)


@pytest.mark.parametrize("header", [b"[1, 2, 3]", b'"text"', b"{\"a\": 1}", b"{\"a\": {\"dtype\": \"F32\"}}"])
def test_malformed_safetensors_header_names_the_file(tmp_path, header):
    import struct
    path = str(tmp_path / "h.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=re.escape(path)):
        load_checkpoint(_fresh(), path)


def test_safetensors_tensors_are_read_one_at_a_time(tmp_path, monkeypatch):
    """A safetensors checkpoint is not read whole: each tensor is read just before its copy."""
    from internvit_fast import checkpoint
    src, dst = _fresh(), _fresh()
    save_file(src.state_dict(), str(tmp_path / "m.safetensors"))
    sd = checkpoint.read_state_dict(str(tmp_path / "m.safetensors"))
    assert all(isinstance(v, checkpoint.LazyTensor) for v in sd.values())
    load_checkpoint(dst, str(tmp_path / "m.safetensors"))
    assert_same_weights(src, dst)


# --- pretrained ViT files into the segmentation models (no FPN in any pretrained file) ----------

def _vit_only(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("up1.", "up2.", "up3.", "up4."))}


def test_pretrained_vit_file_loads_into_a_model_with_fpn_strictly(tmp_path, caplog):
    src = _fresh()
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    dst = _fresh(with_fpn=True, out_indices=[0, 1, 2, 3])
    fpn_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("up")}
    with caplog.at_level(logging.INFO, logger="internvit_fast"):
        missing, unexpected = load_checkpoint(dst, tmp_path / "vit.pth")  # strict by default
    assert missing and all(k.startswith(("up1.", "up2.", "up3.", "up4.")) for k in missing) and unexpected == []
    assert "without the FPN" in caplog.text
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in _vit_only(dst).items())
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in fpn_before.items()), "the FPN was touched"
    # the README's example: pretrained= on a segmentation backbone
    InternViT6B(**dict(SMALL, dtype=torch.float32, with_fpn=True, out_indices=[0, 1, 2, 3],
                       pretrained=str(tmp_path / "vit.pth")))


def test_a_file_with_part_of_the_fpn_is_still_strict(tmp_path):
    src = _fresh(with_fpn=True, out_indices=[0, 1, 2, 3])
    sd = dict(src.state_dict())
    del sd["up2.0.weight"]
    torch.save(sd, tmp_path / "seg.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['up2.0.weight'\]"):
        load_checkpoint(_fresh(with_fpn=True, out_indices=[0, 1, 2, 3]), tmp_path / "seg.pth")
    sd = _vit_only(src)
    del sd["blocks.0.norm1.weight"]
    torch.save(sd, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.0.norm1.weight'\]"):
        load_checkpoint(_fresh(with_fpn=True, out_indices=[0, 1, 2, 3]), tmp_path / "vit.pth")
