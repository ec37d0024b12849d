"""`diffusion-pl prepare` on bad input, through its command-line entry: unreadable image files
(--skip_bad), mixed image sizes (--mixed_sizes), --overwrite of folders prepare did not write,
and the temporary folders a killed prepare leaves beside its output."""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_pl.data.writer import MANIFEST, PrepareError, Sample, write_shards
from diffusion_pl.data.png import encode_png
from diffusion_pl.cli.prepare import main
from tests.support.paths import REPO

prep = importlib.import_module("diffusion_pl.data.writer")
prepare_cli = importlib.import_module("diffusion_pl.cli.prepare")


def make_tree(root: Path, classes=("cat", "dog"), n=4, ext="jpg", size=(8, 8)) -> Path:
    """root/<class>/<i>.<ext>: distinct images of size (width, height)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (60 * c, 30 * i, 100)).save(root / name / f"{i:04d}.{ext}")
    return root


def jpeg_bytes(size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusion-pl prepare: error: ") and "\n" not in err, err
    return err


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: os.kill(pid, 0) now fails
    return proc.pid


def prepare_output(out: Path, n=2) -> Path:
    """An earlier prepare output at out (its own files only)."""
    def samples():
        for i in range(n):
            yield Sample(f"{i:08d}", encode_png(np.full((4, 4, 3), i, np.uint8)), "png", 0)
    write_shards(samples(), out, classes=["a"], shard_size=1)
    return out


# ----------------------------------------------------------------------------- unreadable image files
BAD = {
    "zero bytes": (b"", "zero bytes"),
    "not an image": (b"<html>404 not found</html>", "not an image file"),
    "truncated": (jpeg_bytes()[:-300], "truncat"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_stops_with_one_line_naming_it(tmp_path, capsys, kind):
    src = make_tree(tmp_path / "src")
    (src / "cat" / "0003.jpg").write_bytes(BAD[kind][0])
    out = tmp_path / "out"
    assert main(["folder", str(src), "--out", str(out)]) == 2
    err = error_line(capsys)
    assert "cat/0003.jpg is not a readable image (" in err and BAD[kind][1] in err.lower() and "--skip_bad" in err
    assert not out.exists() and hidden(tmp_path) == []  # nothing left behind


def test_bad_member_of_tar_gz_is_named(tmp_path, capsys):
    src = make_tree(tmp_path / "data" / "train")
    (src / "dog" / "0001.jpg").write_bytes(b"")
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "data", arcname="data")
    assert main(["folder", str(tmp_path / "data.tar.gz"), "--split", "train", "--out", str(tmp_path / "o")]) == 2
    assert f"data/train/dog/0001.jpg in {tmp_path / 'data.tar.gz'} is not a readable image (zero bytes)" \
        in error_line(capsys)


def test_skip_bad_leaves_files_out_counts_and_names_them(tmp_path, capsys):
    src = make_tree(tmp_path / "src", n=6)
    bad = [f"cat/{i:04d}.jpg" for i in range(4)] + ["dog/0000.jpg", "dog/0001.jpg", "dog/0002.jpg"]
    for name in bad:
        (src / name).write_bytes(b"")
    args = ["folder", str(src), "--skip_bad", "--shard_size", "2"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("wrote 5 images")
    assert lines[1].startswith("skipped 7 unreadable image files (--skip_bad): ") and lines[1].endswith("and 2 more")
    assert lines[1].count("(zero bytes)") == 5
    m = manifest(tmp_path / "o")
    assert m["skipped"] == 7 and m["count"] == 5 and [s["count"] for s in m["shards"]] == [2, 2, 1]
    keys = [member.name.split(".")[0] for s in m["shards"] for member in tarfile.open(tmp_path / "o" / s["name"])]
    assert sorted(set(keys)) == [f"{j:08d}" for j in range(5)]  # keys stay contiguous
    assert main([*args, "--out", str(tmp_path / "p")]) == 0  # still byte-for-byte reproducible
    assert (tmp_path / "o" / MANIFEST).read_bytes() == (tmp_path / "p" / MANIFEST).read_bytes()
    # --max_samples counts written images: skipped files are replaced by the next ones
    assert main([*args, "--max_samples", "4", "--out", str(tmp_path / "q")]) == 0
    assert manifest(tmp_path / "q")["count"] == 4


def test_only_bad_files_with_skip_bad_is_one_line(tmp_path, capsys):
    src = make_tree(tmp_path / "src", n=1)
    for p in src.rglob("*.jpg"):
        p.write_bytes(b"")
    assert main(["folder", str(src), "--skip_bad", "--out", str(tmp_path / "o")]) == 2
    assert "yielded no samples (2 unreadable files skipped)" in error_line(capsys)


def test_write_shards_names_the_sample_whose_bytes_are_no_image(tmp_path):
    def samples():
        yield Sample("00000000", encode_png(np.zeros((4, 4, 3), np.uint8)), "png", 0)
        yield Sample("00000001", b"junk", "jpg", 0)

    with pytest.raises(PrepareError, match=r"sample 00000001 is not a readable image \(not an image file\)"):
        write_shards(samples(), tmp_path / "o", classes=["a"])
    skipped = []
    m = write_shards(samples(), tmp_path / "o", classes=["a"], skip_bad=True, on_skip=skipped.append)
    assert m["count"] == 1 and m["skipped"] == 1 and [u.origin for u in skipped] == ["sample 00000001"]


# ----------------------------------------------------------------------------- image sizes
def test_uniform_sizes_manifest(tmp_path):
    assert main(["folder", str(make_tree(tmp_path / "src")), "--out", str(tmp_path / "o")]) == 0
    m = manifest(tmp_path / "o")
    assert m["image_size"] == [8, 8] and m["mixed_sizes"] is False and m["skipped"] == 0
    assert {"format", "source", "split", "count", "channels", "image_format", "classes", "num_classes",
            "shards"} <= set(m)  # the keys that were there before


def test_mixed_sizes_are_refused_naming_two_files(tmp_path, capsys):
    src = make_tree(tmp_path / "src")
    Image.new("RGB", (16, 12)).save(src / "dog" / "0009.jpg")
    assert main(["folder", str(src), "--out", str(tmp_path / "o")]) == 2
    err = error_line(capsys)
    assert "images differ in size: " in err and "dog/0009.jpg is 16x12 (width x height)" in err
    assert " is 8x8 but " in err and "--mixed_sizes" in err
    assert not (tmp_path / "o").exists() and hidden(tmp_path) == []
    assert main(["folder", str(src), "--mixed_sizes", "--out", str(tmp_path / "o")]) == 0
    m = manifest(tmp_path / "o")
    assert m["image_size"] is None and m["mixed_sizes"] is True and m["count"] == 9


# ----------------------------------------------------------------------------- --overwrite
@pytest.mark.parametrize("kind", ["user files", "prepare output plus a user file", "another format"])
def test_overwrite_refuses_a_folder_prepare_did_not_write(tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "user files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif kind == "prepare output plus a user file":
        prepare_output(out)
        (out / "thesis.tex").write_text("years of work")
    else:
        out.mkdir()
        (out / MANIFEST).write_text(json.dumps({"format": "someone-else/3", "shards": []}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = make_tree(tmp_path / "src")
    for flags in ([], ["--overwrite"]):
        assert main(["folder", str(src), "--out", str(out), *flags]) == 2
        err = error_line(capsys)
        assert f"output directory {out} is not empty and is not a prepare output" in err
        assert "even with --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and hidden(tmp_path) == []


def test_overwrite_replaces_an_earlier_prepare_output(tmp_path, capsys):
    out = prepare_output(tmp_path / "out", n=3)
    src = make_tree(tmp_path / "src")
    assert main(["folder", str(src), "--out", str(out)]) == 2
    assert f"output directory {out} holds an earlier prepare output: pass --overwrite" in error_line(capsys)
    assert main(["folder", str(src), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-000000.tar"]
    assert manifest(out)["count"] == 8 and hidden(tmp_path) == []


def test_a_file_put_into_out_while_writing_is_kept(tmp_path):
    out = prepare_output(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def samples():
        yield Sample("00000000", encode_png(np.zeros((4, 4, 3), np.uint8)), "png", 0)
        (out / "thesis.tex").write_text("written meanwhile")

    with pytest.raises(PrepareError, match=r"is no longer empty or a prepare output \(it holds 'thesis.tex'"):
        write_shards(samples(), out, classes=["a"], overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**before, "thesis.tex": b"written meanwhile"}
    assert hidden(tmp_path) == []


# ----------------------------------------------------------------------------- killed prepares
def test_leftovers_of_dead_prepares_are_removed(tmp_path):
    out, pid = tmp_path / "out", dead_pid()
    prepare_output(out)
    partials = [tmp_path / f".out.partial-{pid}", tmp_path / f".out.partial-{pid}@{prep._host()}"]  # old, new names
    for partial in partials:
        partial.mkdir()
        (partial / "shard-000000.tar").write_bytes(b"half a shard")
    old = prepare_output(tmp_path / f".out.old-{pid}@{prep._host()}")
    mine = tmp_path / f".out.partial-{pid}-notes"  # not a prepare name: never touched
    mine.mkdir()
    odd = tmp_path / f".out.partial-{dead_pid()}@{prep._host()}"  # a dead prepare's name, but a user file inside
    odd.mkdir()
    (odd / "notes.txt").write_text("mine")
    assert main(["folder", str(make_tree(tmp_path / "src")), "--out", str(out), "--overwrite"]) == 0
    assert not old.exists() and not any(p.exists() for p in partials)
    assert hidden(tmp_path) == sorted([mine.name, odd.name]) and (odd / "notes.txt").is_file()


def test_interrupted_swap_puts_the_previous_output_back(tmp_path, capsys):
    # killed between "OUT -> .OUT.old-<pid>" and ".OUT.partial-<pid> -> OUT": no OUT, both hidden
    pid = dead_pid()
    old = prepare_output(tmp_path / f".out.old-{pid}@{prep._host()}")
    previous = {p.name: p.read_bytes() for p in old.iterdir()}
    prepare_output(tmp_path / f".out.partial-{pid}@{prep._host()}", n=5)
    out, src = tmp_path / "out", make_tree(tmp_path / "src")
    assert main(["folder", str(src), "--out", str(out)]) == 2  # the earlier output is back, not replaced
    assert "holds an earlier prepare output" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous and hidden(tmp_path) == []
    assert main(["folder", str(src), "--out", str(out), "--overwrite"]) == 0
    assert manifest(out)["count"] == 8


@pytest.mark.parametrize("host", ["", "@this", "@other-node"])
def test_a_live_prepare_is_left_alone_and_refused(tmp_path, capsys, host):
    name = {"": "", "@this": f"@{prep._host()}", "@other-node": "@other-node"}[host]
    pid = os.getppid() if host != "@other-node" else dead_pid()  # another host's pid cannot be checked
    partial = tmp_path / f".out.partial-{pid}{name}"
    partial.mkdir()
    (partial / "shard-000000.tar").write_bytes(b"being written")
    assert main(["folder", str(make_tree(tmp_path / "src")), "--out", str(tmp_path / "out")]) == 2
    err = error_line(capsys)
    assert f"another prepare (process {pid}" in err and str(partial) in err and "wait for it to finish" in err
    assert ("on other-node" in err) == (host == "@other-node")
    assert partial.is_dir() and not (tmp_path / "out").exists()
    prepare_output(tmp_path / "out")  # the library writer (a DDP rank) lets the other writer finish
    assert partial.is_dir()


@pytest.mark.slow
def test_prepare_killed_midway_is_cleaned_up_by_the_next_run(tmp_path, capsys):
    # A real prepare process, stopped mid-write: one of its files is a FIFO, so after writing the
    # shards before it (shard size 1) it blocks in open() with its partial folder on disk.
    src, position = make_tree(tmp_path / "blocking", n=10), 3
    index = np.random.default_rng(prep.ORDER_SEED).permutation(20)[position]  # 4th file read of the sorted 20
    fifo = src / ("cat", "dog")[index // 10] / f"{index % 10:04d}.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # run as a script: it does not import torch, so it starts in about 2 s
    proc = subprocess.Popen([sys.executable, prepare_cli.__file__, "folder", str(src), "--shard_size", "1", "--out",
                             str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob(f".out.partial-{proc.pid}@*/shard-*.tar"))) < position:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the prepare subprocess wrote no shards in 60 s"
            time.sleep(0.05)
        other = make_tree(tmp_path / "other")
        assert main(["folder", str(other), "--out", str(out)]) == 2  # it is alive: refused, left alone
        assert f"another prepare (process {proc.pid})" in error_line(capsys)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    [partial] = hidden(tmp_path)
    assert partial.startswith(f".out.partial-{proc.pid}@") and not out.exists()  # what kill -9 leaves
    assert main(["folder", str(other), "--out", str(out)]) == 0
    assert hidden(tmp_path) == [] and manifest(out)["count"] == 8


# ----------------------------------------------------------------------------- help
def test_help_describes_the_new_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["folder", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--skip_bad" in text and "'skipped' in manifest.json" in text
    assert "--mixed_sizes" in text and '"mixed_sizes": true' in text and "explicit image_size" in text
    assert "earlier prepare output" in text and "refused, even with this flag" in text


def test_a_flat_folder_is_unlabelled_data_and_trains_the_quick_start(tmp_path, capsys):
    """`prepare folder` takes images with no class folders (the manifest lists no classes), and the quick-start
    recipe trains on them, its network's channels and size taken from the data (8x8 here)."""
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 20, 200)).save(src / f"{i:03d}.png")
    assert main(["folder", str(src), "--out", str(tmp_path / "shards")]) == 0
    assert "wrote 6 images (unlabelled)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
    assert manifest["count"] == 6 and manifest["classes"] == [] and manifest["num_classes"] == 0
    from diffusion_pl.cli.main import main as cli

    root = tmp_path / "run"
    assert cli(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.shards", str(tmp_path / "shards"),
                "--data.batch_size", "2", "--trainer.max_steps", "1", "--trainer.default_root_dir", str(root),
                "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]"]) == 0
    assert "img_resolution=8 (from the data)" in capsys.readouterr().err
    assert list((root / "checkpoints").glob("*.ckpt"))


def test_a_flat_folder_mixed_with_class_folders_is_refused_in_one_line(tmp_path, capsys):
    src = make_tree(tmp_path / "mixed", n=2)
    Image.new("RGB", (8, 8)).save(src / "loose.png")
    assert main(["folder", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixes images in class folders with images outside them (loose.png)" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "tar.gz"])
def test_tar_members_leading_outside_the_archive_are_counted_and_left_out(tmp_path, capsys, compressed):
    """`../x`, `/x` and `cat/../../x` are counted and named in the summary line (and the manifest), never read
    as an image of class '' or of a class above the root; `./cat/x` is the member `cat/x`."""
    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    archive = tmp_path / ("data.tar.gz" if compressed else "data.tar")
    with tarfile.open(archive, "w:gz" if compressed else "w") as tar:
        for name in ["./cat/0.png", "dog/1.png", "../evil/2.png", "/3.png", "cat/../../4.png", "dog//5.png"]:
            info = tarfile.TarInfo(name)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    assert main(["folder", str(archive), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("wrote 3 images (2 classes)") and out.count("\n") == 0, out
    assert "left out 3 tar members" in out and all(n in out for n in ("../evil/2.png", "/3.png", "cat/../../4.png"))
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert manifest["classes"] == ["cat", "dog"] and manifest["count"] == 3
    assert manifest["unsafe_tar_members"] == {"count": 3, "names": ["../evil/2.png", "/3.png", "cat/../../4.png"]}
