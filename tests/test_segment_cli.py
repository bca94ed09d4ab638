"""python -m internvit_fast segment: masks for images without MMSegmentation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL", reason="the segment command needs Pillow (the [segment] extra)")
pytest.importorskip("tqdm", reason="the segment command needs tqdm (the [segment] extra)")
from PIL import Image  # noqa: E402

from internvit_fast.segmentation.ade20k import CLASSES, PALETTE  # noqa: E402
from internvit_fast.segmentation.segmentor import Segmentor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def segment(*args, env=None):
    e = dict(os.environ, TRITON_INTERPRET="0", **(env or {}))
    return subprocess.run([sys.executable, "-m", "internvit_fast", "segment", *map(str, args)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(folder / "street.png")
    Image.fromarray(rng.integers(0, 256, (70, 61, 3), dtype=np.uint8)).save(folder / "room.jpg")
    (folder / "notes.png").write_bytes(b"not an image")  # reported and skipped
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(3)
    seg = Segmentor.build("small", fast=False, dtype=torch.float32)
    torch.save({"meta": {}, "state_dict": seg.state_dict()}, tmp_path / "seg.pth")
    return seg, tmp_path / "seg.pth"


def test_segment_writes_labels_and_overlays_equal_to_predict(tmp_path, images, checkpoint):
    seg, ckpt = checkpoint
    out = tmp_path / "out"
    p = segment("--config", "small", "--checkpoint", ckpt, images, "--out", out, "--no-fast", "--json")
    assert p.returncode == 1, p.stderr  # one image failed
    assert "notes.png: skipped" in p.stderr and len([ln for ln in p.stderr.splitlines() if "skipped" in ln]) == 1
    records = {os.path.basename(r["image"]): r for r in json.loads(p.stdout)}
    assert "error" in records["notes.png"]
    assert sorted(os.listdir(out)) == ["room_labels.png", "room_overlay.png", "street_labels.png", "street_overlay.png"]
    for name, stem in (("street.png", "street"), ("room.jpg", "room")):
        r = records[name]
        image = torch.from_numpy(np.asarray(Image.open(images / name).convert("RGB")).copy()).permute(2, 0, 1)
        assert r["size"] == list(image.shape[1:]) and r["seconds"] > 0
        want = seg.predict(image)[0]
        lab = Image.open(out / f"{stem}_labels.png")
        assert lab.mode == "P" and lab.getpalette()[:3 * len(PALETTE)] == [c for rgb in PALETTE for c in rgb]
        assert torch.equal(torch.from_numpy(np.asarray(lab).astype(np.int64)), want)
        counts = torch.bincount(want.flatten(), minlength=150)
        assert [c["id"] for c in r["classes"]] == [int(i) for i in torch.argsort(counts, descending=True, stable=True)
                                                   if counts[i] > 0]
        assert sum(c["share"] for c in r["classes"]) == pytest.approx(1.0, abs=1e-3)
        assert all(c["name"] == CLASSES[c["id"]] for c in r["classes"])
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.height >= image.shape[1] and overlay.width > image.shape[2]  # the legend on the right


@pytest.mark.slow
def test_segment_without_checkpoint_says_the_weights_are_random_and_runs_the_fast_path(tmp_path, images):
    out = tmp_path / "out"
    p = segment("--config", "small", images / "room.jpg", "--out", out, "--fast")  # the interpreter, on a CPU
    assert p.returncode == 0, p.stderr
    assert "weights are random" in p.stderr
    assert "segmented 1 of 1 images" in p.stdout
    assert sorted(os.listdir(out)) == ["room_labels.png", "room_overlay.png"]


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty-folder", "a folder with no image files"),
    ("other-head", "--checkpoint: "),
    ("windows", "--batch-windows 0: must be at least 1"),
])
def test_segment_bad_input_is_one_line_and_exit_2(tmp_path, images, checkpoint, case, message):
    args = ["--config", "small", "--out", tmp_path / "out", "--no-fast"]
    if case == "missing":
        args += [tmp_path / "nothing.png"]
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        args += [tmp_path / "empty"]
    elif case == "other-head":  # a linear probe's checkpoint for the UPerNet model
        seg, _ = checkpoint
        sd = {k: v for k, v in seg.state_dict().items() if not k.startswith("decode_head.psp")}
        torch.save(sd, tmp_path / "other.pth")
        args += ["--checkpoint", tmp_path / "other.pth", images]
    else:
        args += ["--batch-windows", "0", images]
    p = segment(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in p.stderr, p.stderr
    if case == "other-head":
        assert "decode_head.psp_modules" in errors[0]


def test_read_image_is_what_mmcvs_loader_gives(tmp_path, monkeypatch):
    """Upright by EXIF orientation, 16-bit grey scaled to its high byte (as OpenCV reads it),
    and a picture over Pillow's pixel limit refused, as a decompression bomb."""
    from internvit_fast.cli.segment import read_image
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (40, 80, 3), dtype=np.uint8))  # 80 wide, 40 high
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert tuple(read_image(str(tmp_path / "rot.jpg")).shape) == (3, 80, 40)
    grey = rng.integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "sixteen.png")
    got = read_image(str(tmp_path / "sixteen.png"))
    assert torch.equal(got, torch.from_numpy((grey >> 8).astype(np.uint8)).expand(3, -1, -1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "bomb.png")  # 400 px > 300
    with pytest.raises(Image.DecompressionBombWarning):
        read_image(str(tmp_path / "bomb.png"))


def test_overlay_blends_the_palette_and_names_the_classes(tmp_path):
    from internvit_fast.cli.segment import save_outputs
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    labels = torch.zeros(30, 40, dtype=torch.int64)
    labels[:12] = 12  # 'person'
    labels[12:, :25] = 2  # 'sky'
    info = save_outputs(image, labels, "x", str(tmp_path))
    assert [(c["name"], c["share"]) for c in info["classes"]] == [("person", 0.4), ("sky", 0.375), ("wall", 0.225)]
    overlay = np.asarray(Image.open(tmp_path / "x_overlay.png").convert("RGB")).astype(np.int64)
    for y, x in ((0, 0), (20, 5), (29, 39)):
        want = np.round(0.5 * image[:, y, x].numpy() + 0.5 * np.array(PALETTE[int(labels[y, x])]))
        assert (overlay[y, x] == want).all(), (y, x)
    legend = overlay[:, 40:]
    for c in (12, 2, 0):  # each class present has its swatch in the legend
        assert (legend == np.array(PALETTE[c])).all(axis=-1).any(), CLASSES[c]


def test_output_names_never_collide_or_overwrite_inputs(tmp_path):
    from internvit_fast.cli.segment import first_line, output_stems
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [str(folder / n) for n in ("a-2.png", "a.jpg", "a.png", "A.png", "b.png", "b_labels.png")]
    for p in paths:
        open(p, "wb").close()
    stems = output_stems(paths, str(folder))  # --out is the input folder
    assert len({s.lower() for s in stems}) == len(stems)
    assert stems[:4] == ["a-2", "a", "a-3", "A-4"]
    assert stems[4] == "b-2"  # b_labels.png is an input: b.png's labels go elsewhere
    assert first_line(MemoryError()) == "MemoryError"  # an exception without a message


def test_segment_refuses_fifos_and_never_writes_through_a_link(tmp_path, images):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    p = segment("--config", "small", "--no-fast", fifo, "--out", tmp_path / "o")
    assert p.returncode == 2 and "not a regular file" in p.stderr
    (images / "blocked.png").unlink(missing_ok=True)
    os.mkfifo(images / "blocked.png")  # in a folder: left out, not waited on
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, out / "room_labels.png")
    p = segment("--config", "small", "--no-fast", images / "room.jpg", images, "--out", out)
    assert p.returncode == 1 and "room.jpg: skipped" in p.stderr
    assert victim.read_text() == "keep"
    assert (out / "street_labels.png").exists() and (out / "room-2_labels.png").exists()


def test_library_calls_never_replace_the_process(monkeypatch, tmp_path):
    """main(argv) called from Python (argv given) must not re-execute the caller's process in
    the interpreter, whatever TRITON_INTERPRET says; only the command line (argv None) may."""
    import internvit_fast
    from internvit_fast import cli
    from internvit_fast.cli import segment as seg

    class Reached(Exception):
        pass

    def restart(*a, **k):
        raise AssertionError("a library call would replace the caller's process")

    def reached(*a, **k):
        raise Reached
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else the restart is skipped: the check could not fail
    monkeypatch.setattr(os, "execve", restart)
    monkeypatch.setattr(Segmentor, "build", reached)
    monkeypatch.setattr(internvit_fast, "InternViT6B", reached)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(Reached):
        seg.main([str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--fast"])
    with pytest.raises(Reached):
        cli.main(["--config", "small", "--paths", "fast", "--device", "cpu"])
    with pytest.raises(Reached):
        cli.main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "out2"), "--fast"])
