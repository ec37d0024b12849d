"""Contracts of the data layer: prepare (deterministic, atomic, every source), streaming
(format, flip, corrupt samples, rank splitting), exact resume under Lightning, DDP."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from diffusion_pl.data.builtin import SHAPES, ensure_shapes
from diffusion_pl.data.writer import Sample, write_shards
from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.data.stream import ShardStream
from diffusion_pl.data.shards import load_manifest, resolve_shards
from diffusion_pl.data.stream import WARN_EVERY, WARN_FIRST, ResumableLoader
from diffusion_pl.data.order import SampleOrder
from diffusion_pl.data.shards import count_samples, shard_counts, tar_samples
from diffusion_pl.data.png import encode_png
from diffusion_pl.cli.prepare import main as prepare_main
from diffusion_pl.utils.errors import DataError, MissingFileError, UserValueError, one_line
from tests.support.data import Recorder
from tests.support.paths import REPO, WORKERS, repo_pythonpath

CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# torchvision >= 0.29 warns on every image decode that it prefers TorchCodec; the decoder works
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Keep the built-in dataset cache inside the test's temporary folder."""
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_folder(root: Path, split: str | None = "train", classes=("dog", "cat"), n=3, fmt="png") -> Path:
    """An image-folder tree root/[split/]<class>/<i>.<fmt> of distinct 8x8 RGB images."""
    for c, name in enumerate(classes):
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * c, 20 * i, 100)).save(folder / f"{i:04d}.{fmt}")
    return root


def make_id_shards(out: Path, n=64, shard_size=8, size=8, seed_image=None) -> Path:
    """Shards of constant-colour images whose colour encodes the sample id (flip-invariant)."""
    def samples():
        for i in range(n):
            image = np.zeros((size, size, 3), np.uint8) + np.array([i // 256, i % 256, 7], np.uint8)
            yield Sample(f"{i:08d}", encode_png(image if seed_image is None else seed_image), "png", i % 3)
    write_shards(samples(), out, classes=["a", "b", "c"], shard_size=shard_size)
    return out


def stream_batches(urls, n, *, workers=0, start=0, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches of a ShardStream through the resumable loader."""
    stream = ShardStream(urls, kwargs.pop("batch_size", 4), **kwargs)
    it = iter(ResumableLoader(stream, lambda: start, num_workers=workers))
    return [next(it) for _ in range(n)]


def batch_hash(batch) -> str:
    images, labels = batch
    return hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------ prepare
def test_prepare_is_deterministic(tmp_path):
    src = make_folder(tmp_path / "src")
    for out in ("a", "b"):
        args = ["folder", str(src), "--split", "train", "--shard_size", "2", "--out", str(tmp_path / out)]
        assert prepare_main(args) == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in shards + ["manifest.json"]:
        assert sha(tmp_path / "a" / name) == sha(tmp_path / "b" / name)


def test_manifest_contents(tmp_path):
    src = make_folder(tmp_path / "src", classes=("zebra", "ant"), n=5)
    assert prepare_main(["folder", str(src), "--split", "train", "--shard_size", "4", "--out", str(tmp_path / "o")]) \
        == 0
    m = load_manifest(str(tmp_path / "o" / "manifest.json"))
    assert m["count"] == 10 and m["image_size"] == [8, 8] and m["channels"] == 3
    assert m["classes"] == ["ant", "zebra"] and m["num_classes"] == 2 and m["split"] == "train"
    assert [s["count"] for s in m["shards"]] == [4, 4, 2]
    for s in m["shards"]:
        assert s["sha256"] == sha(tmp_path / "o" / s["name"])
    labels = [int(x["cls"]) for s in m["shards"] for x in tar_samples(str(tmp_path / "o" / s["name"]))]
    assert sorted(labels) == [0] * 5 + [1] * 5


def test_refuses_to_overwrite(tmp_path, capsys):
    src, out = make_folder(tmp_path / "src"), tmp_path / "out"
    assert prepare_main(["folder", str(src), "--out", str(out)]) == 0
    before = sha(out / "manifest.json")
    assert prepare_main(["folder", str(src), "--shard_size", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and "--overwrite" in err
    assert sha(out / "manifest.json") == before  # refused: untouched
    assert prepare_main(["folder", str(src), "--shard_size", "2", "--out", str(out), "--overwrite"]) == 0
    assert sha(out / "manifest.json") != before and len(list(out.glob("*.tar"))) == 3
    # (a non-empty folder that prepare did not write is refused even with --overwrite: test_prepare.py)


def test_crash_midway_leaves_no_final_files(tmp_path):
    def failing():
        for i in range(5):
            yield Sample(f"{i:08d}", encode_png(np.zeros((4, 4, 3), np.uint8)), "png", 0)
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(failing(), tmp_path / "new", classes=["a"], shard_size=2)
    assert not (tmp_path / "new").exists()
    old = make_id_shards(tmp_path / "old", n=4)
    before = {p.name: sha(p) for p in old.iterdir()}
    with pytest.raises(RuntimeError):
        write_shards(failing(), old, classes=["a"], shard_size=2, overwrite=True)
    assert {p.name: sha(p) for p in old.iterdir()} == before  # the old output is untouched
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def fake_cifar(folder: Path, n=4) -> tuple[np.ndarray, list[int]]:
    """A tiny cifar-10-batches-py folder; returns the train images (N, 32, 32, 3) and labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
        if name != "test_batch":
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys += labels
    names = [c.encode() for c in ("airplane automobile bird cat deer dog frog horse ship truck".split())]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return np.concatenate(xs), ys


def test_local_cifar_batches(tmp_path, capsys):
    images, labels = fake_cifar(tmp_path / "cifar-10-batches-py")
    assert prepare_main(["cifar10-batches", str(tmp_path / "cifar-10-batches-py"), "--out", str(tmp_path / "o")]) == 0
    m = load_manifest(str(tmp_path / "o" / "manifest.json"))
    assert m["count"] == 20 and m["num_classes"] == 10 and m["classes"][0] == "airplane"
    got = [x for s in m["shards"] for x in tar_samples(str(tmp_path / "o" / s["name"]))]
    decoded = sorted((np.asarray(Image.open(io.BytesIO(x["png"]))).tobytes(), int(x["cls"])) for x in got)
    assert decoded == sorted((im.tobytes(), y) for im, y in zip(images, labels, strict=True))  # lossless, labels kept
    assert prepare_main(["cifar10-batches", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data_batch_1" in err and "cifar-10-batches-py" in err


def test_torchvision_download_failure_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)  # hermetic: never touch the network
    assert prepare_main(["cifar10", "--root", str(tmp_path / "tv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "could not download CIFAR-10" in err
    assert "cifar10-batches" in err and "folder" in err and not (tmp_path / "o").exists()


def test_image_folder_tree_and_tar_gz_agree(tmp_path):
    src = make_folder(tmp_path / "data", split="train")
    make_folder(src, split="test", fmt="jpg")
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="data")
    for name, path in (("tree", src), ("tgz", tmp_path / "data.tar.gz")):
        for split in ("train", "test"):
            out = tmp_path / f"{name}-{split}"
            assert prepare_main(["folder", str(path), "--split", split, "--out", str(out)]) == 0
    for split in ("train", "test"):
        shard = "shard-000000.tar"
        assert sha(tmp_path / f"tree-{split}" / shard) == sha(tmp_path / f"tgz-{split}" / shard)
    test = list(tar_samples(str(tmp_path / "tgz-test" / "shard-000000.tar")))
    originals = {p.read_bytes() for p in (src / "test").rglob("*.jpg")}
    assert len(test) == 6 and {x["jpg"] for x in test} == originals  # JPEG bytes kept as-is


def test_no_images_found_is_one_line(tmp_path, capsys):
    make_folder(tmp_path / "src", split="train")
    assert prepare_main(["folder", str(tmp_path / "src"), "--split", "val", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no images found" in err and "val" in err


@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"{CIFAR_TAR} is absent (the shared CIFAR-10 JPEG tar)")
def test_real_cifar_jpeg_tar(tmp_path):
    out = tmp_path / "cifar"
    assert prepare_main(["folder", str(CIFAR_TAR), "--split", "train", "--max_samples", "300",
                         "--shard_size", "100", "--out", str(out)]) == 0
    m = load_manifest(str(out / "manifest.json"))
    assert m["count"] == 300 and m["image_size"] == [32, 32] and m["image_format"] == ["jpg"]
    assert m["classes"] == "airplane automobile bird cat deer dog frog horse ship truck".split()
    dm = ShardDataModule(str(out), batch_size=50, num_workers=0, shuffle_buffer=100)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (50, 3, 32, 32) and dm.num_classes == 10 and dm.image_size == 32
    assert len(set(labels.tolist())) > 3  # the fixed permutation mixes classes


# ------------------------------------------------------------------------------ streaming
def test_builtin_shapes_batches():
    dm = ShardDataModule("builtin:shapes?size=16&count=300", batch_size=32, num_workers=0, shuffle_buffer=64)
    assert (dm.num_classes, dm.image_size, dm.channels) == (len(SHAPES), 16, 3)  # known before generation
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.float32 and images.shape == (32, 3, 16, 16)
    assert -1.0 <= images.min() < -0.5 and 0.5 < images.max() <= 1.0
    assert labels.dtype == torch.int64 and labels.shape == (32,) and 0 <= labels.min() and labels.max() < len(SHAPES)
    first = ensure_shapes(16, 300)
    m = load_manifest(str(first / "manifest.json"))
    assert m["count"] == 300 and m["classes"] == list(SHAPES)


def test_builtin_is_deterministic(tmp_path, monkeypatch):
    digests = []
    for name in ("c1", "c2"):
        monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / name))
        folder = ensure_shapes(16, 600)
        digests.append([sha(p) for p in sorted(folder.glob("*.tar"))])
    assert digests[0] == digests[1] and len(digests[0]) == 2


def test_image_size_resizes(tmp_path):
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=8, size=12)))[0]
    (images, _), = stream_batches(urls, 1, image_size=(8, 8), shuffle_buffer=0)
    assert images.shape == (4, 3, 8, 8)


def test_random_flip_flips_some(tmp_path):
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, 4:] = 255  # bright right half: a flipped image is bright on the left
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=64, seed_image=half)))[0]
    for flip in (True, False):
        images = torch.cat([b[0] for b in stream_batches(urls, 8, batch_size=8, random_flip=flip)])
        flipped = (images[:, 0, 0, 0] > 0).float().mean().item()
        assert (0.2 < flipped < 0.8) if flip else flipped == 0.0


class Overtime(BaseException):
    """Not an Exception: the data reader's `except Exception` must not swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (not hang) when the block runs longer than `seconds`: the bug these tests guard is a spin."""
    def expire(signum, frame):
        raise Overtime(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_tar(path: Path, images: list[bytes], keys: list[str] | None = None) -> Path:
    """A shard of raw image bytes (no checks, unlike write_shards: corrupt bytes stay in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, data in enumerate(images):
            sink.write({"__key__": keys[i] if keys else f"s{i:05d}", "png": data, "cls": b"0"})
    return path


def write_manifest(folder: Path, counts: list[int], **fields) -> Path:
    """A hand-made manifest.json for the shard-%06d.tar files of folder."""
    shards = [{"name": f"shard-{i:06d}.tar", "count": c} for i, c in enumerate(counts)]
    (folder / "manifest.json").write_text(json.dumps({"count": sum(counts), "classes": ["a"], "channels": 3,
                                                      "image_size": [4, 4], "shards": shards, **fields}))
    return folder


def test_corrupt_sample_is_skipped_counted_logged(tmp_path, caplog):
    images = [b"not an image" if i == 2 else encode_png(np.full((4, 4, 3), i, np.uint8)) for i in range(6)]
    tar = write_tar(tmp_path / "bad.tar", images)
    stream = ShardStream([str(tar)], 6, shuffle_buffer=0, random_flip=False, infinite=False)
    with caplog.at_level(logging.WARNING):
        (images, labels), = list(stream)
    assert images.shape[0] == 5 and stream.skipped == 1
    lines = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 1 and "'s00002'" in lines[0] and "1 skipped so far" in lines[0]


def test_undecodable_warnings_are_rate_limited(tmp_path, caplog):
    good = encode_png(np.zeros((4, 4, 3), np.uint8))
    tar = write_tar(tmp_path / "bad.tar", [good] + [b"junk"] * (WARN_EVERY + 100))
    stream = ShardStream([str(tar)], 64, shuffle_buffer=0, infinite=False, max_bad_samples=10 * WARN_EVERY)
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    assert sum(b[0].shape[0] for b in batches) == 1 and stream.skipped == WARN_EVERY + 100
    lines = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == WARN_FIRST + 1 and f"{WARN_EVERY} skipped so far" in lines[-1]
    assert "logged every" in lines[WARN_FIRST - 1]


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("manifest", [True, False])
def test_all_undecodable_data_stops_with_one_line_data_error(tmp_path, monkeypatch, workers, manifest):
    # torch joins a worker that raised for MP_STATUS_CHECK_INTERVAL (5 s) before killing it
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    folder = tmp_path / "bad"
    write_tar(folder / "shard-000000.tar", [b"not an image"] * 8)
    write_tar(folder / "shard-000001.tar", [b"not an image"] * 5)
    if manifest:
        write_manifest(folder, [8, 5])
    dm = ShardDataModule(str(folder) if manifest else f"{folder}/shard-{{000000..000001}}.tar", batch_size=4,
                         num_workers=workers)
    with deadline(60), pytest.raises(DataError) as info:  # without a manifest the size probe already fails
        dm.setup("fit")
        next(iter(dm.train_dataloader()))
    line = one_line(info.value)  # a worker's error comes back with its traceback: the last line is ours
    assert "shard-000000.tar" in line and "decodable" in line and "expected" in line, line
    assert "\n" not in str(info.value) or workers, str(info.value)


@pytest.mark.slow
def test_undecodable_run_is_bounded(tmp_path):
    folder = tmp_path / "bad"
    write_tar(folder / "shard-000000.tar", [b"x"] * 300)
    stream = ShardStream([str(folder / "shard-000000.tar")], 4, max_bad_samples=50)
    with deadline(60), pytest.raises(DataError, match="50 samples in a row"):
        next(iter(stream))
    assert stream.skipped == 50  # stopped at the bound, not after a pass


@pytest.mark.parametrize("option,value", [
    ("batch_size", 0), ("batch_size", -4), ("batch_size", 2.5), ("batch_size", True), ("val_batch_size", 0),
    ("num_workers", -1), ("shuffle_buffer", -1), ("image_size", 0), ("max_bad_samples", 0),
])
def test_numeric_options_are_checked(option, value):
    with pytest.raises(UserValueError) as info:
        ShardDataModule("builtin:shapes?size=8&count=16", **{option: value})
    message = str(info.value)
    assert "\n" not in message and f"{option}={value!r}" in message and "expected an integer" in message


def test_too_few_samples_for_the_readers_is_one_line(tmp_path):
    shards = str(make_id_shards(tmp_path / "s", n=6, shard_size=3))
    dm = ShardDataModule(shards, batch_size=2, num_workers=8)
    dm.setup("fit")
    with pytest.raises(UserValueError, match="6 samples, fewer than its 8 readers"):
        dm.train_dataloader()


def test_mixed_sizes_need_an_explicit_image_size(tmp_path):
    folder = tmp_path / "mixed"
    write_tar(folder / "shard-000000.tar", [encode_png(np.zeros((s, s, 3), np.uint8)) for s in (8, 12, 8, 12)])
    write_manifest(folder, [4], image_size=None, mixed_sizes=True)
    dm = ShardDataModule(str(folder), batch_size=4, num_workers=0)
    assert dm.image_size is None
    with pytest.raises(UserValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and "mixed sizes" in message and "image_size" in message and str(folder) in message
    dm = ShardDataModule(str(folder), batch_size=4, num_workers=0, image_size=8)
    dm.setup("fit")
    assert dm.output_size == (8, 8) and next(iter(dm.train_dataloader()))[0].shape == (4, 3, 8, 8)


@pytest.mark.parametrize("n_shards", [8, 1])  # more shards than readers, or fewer (readers share a shard)
def test_ranks_and_workers_see_disjoint_samples(tmp_path, n_shards, sample_ids):
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=64, shard_size=64 // n_shards)))[0]
    seen = []
    for rank in (0, 1):
        batches = stream_batches(urls, 4, workers=2, rank=rank, world_size=2, shuffle_buffer=4)
        seen.append([i for b in batches for i in sample_ids(b[0])])
    assert len(set(seen[0])) == len(seen[0]) == 16 and len(set(seen[1])) == 16  # one pass: no repeats
    assert not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("workers,start,shuffle,world", [
    (0, 5, 16, 1), (2, 4, 16, 1), (2, 3, 16, 1),  # 3: not a multiple of the workers (roles rotate)
    (0, 13, 16, 1), (2, 13, 16, 1), (0, 13, 0, 1),  # past a pass boundary (a pass is 10 batches here)
    (0, 7, 3, 2), (2, 7, 16, 2),  # rank 1 of 2
])
def test_stream_fast_forward_matches(tmp_path, workers, start, shuffle, world):
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=40, shard_size=5)))[0]
    kw = {"workers": workers, "shuffle_buffer": shuffle, "rank": world - 1, "world_size": world}
    full = [batch_hash(b) for b in stream_batches(urls, 24, **kw)]
    resumed = [batch_hash(b) for b in stream_batches(urls, 24 - start, start=start, **kw)]
    assert resumed == full[start:]


def test_stream_follows_the_order_function(tmp_path, sample_ids):
    # the stream reads exactly what SampleOrder says, so the draw-count tests below hold for it
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=37, shard_size=5)))[0]
    stream = ShardStream(urls, 5, shuffle_buffer=4, seed=3)
    it = iter(stream)
    got = [i for _ in range(20) for i in sample_ids(next(it)[0])]  # 100 slots: 2.7 passes of 37
    order = SampleOrder([5] * 7 + [2], 1, seed=3, shuffle_buffer=4)
    expected = np.concatenate([order.pass_ids(e, 0) for e in range(3)])[:100]
    assert got == expected.tolist() and sorted(got[:37]) == list(range(37))


def draw_counts(counts: list[int], readers: int, passes: int, **kwargs) -> np.ndarray:
    """Draws per stored sample over `passes` passes of all readers; asserts readers are disjoint per pass."""
    order = SampleOrder(counts, readers, **kwargs)
    hits = np.zeros(order.total, np.int64)
    for e in range(passes):
        ids = np.concatenate([order.pass_ids(e, r) for r in range(readers)])
        assert len(ids) == readers * (order.total // readers)
        assert len(np.unique(ids)) == len(ids), "a sample was read twice within one pass"
        hits += np.bincount(ids, minlength=order.total)
    return hits


@pytest.mark.parametrize("counts,readers,passes", [
    ([100] * 5, 4, 20),  # 5 shards on 4 readers: was 253/500/500/500/247 draws per shard
    ([6] * 10, 4, 30),  # whole shards could not be split evenly
    ([9, 1], 5, 30),  # fewer shards than readers, uneven shards
])
def test_every_sample_is_drawn_once_per_pass_when_readers_divide_it(counts, readers, passes):
    hits = draw_counts(counts, readers, passes, shuffle_buffer=7, seed=1)
    assert (hits == passes).all(), np.unique(hits)


@pytest.mark.parametrize("counts,readers,passes", [
    ([3, 7, 5, 2, 9], 4, 2000),  # N = 26, 2 positions left out per pass
    ([13, 6], 8, 2000),  # fewer shards than readers: 3 left out
    ([40] * 50, 32, 200),  # CIFAR-10's 50 shards on 8 GPUs x 4 workers (smaller shards): 16 left out
])
def test_every_sample_is_drawn_equally_often_in_expectation(counts, readers, passes):
    hits = draw_counts(counts, readers, passes, shuffle_buffer=16, seed=0)
    n = sum(counts)
    p = readers * (n // readers) / n  # chance a sample is read in a pass
    sigma = (passes * p * (1 - p)) ** 0.5
    assert hits.max() <= passes and np.abs(hits - passes * p).max() < 5 * sigma + 1, (hits.min(), hits.max())
    per_shard = np.add.reduceat(hits, np.concatenate([[0], np.cumsum(counts)[:-1]])) / np.asarray(counts)
    assert per_shard.max() / per_shard.min() < 1.05  # the old split drew some shards 2x as often


def test_real_shards_are_drawn_equally(tmp_path, sample_ids):
    # 5 shards of 8 on 4 readers (2 ranks x 2 workers), 3 passes = 30 slots per reader
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=40, shard_size=8)))[0]
    ids = [i for rank in (0, 1) for b in stream_batches(urls, 12, workers=2, rank=rank, world_size=2, batch_size=5)
           for i in sample_ids(b[0])]
    assert np.bincount(ids, minlength=40).tolist() == [3] * 40


@pytest.mark.parametrize("shuffle", [16, 0])
def test_resume_work_does_not_grow_with_the_consumed_count(tmp_path, shuffle, sample_ids):
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=64, shard_size=8)))[0]
    order = SampleOrder([8] * 8, 1, shuffle_buffer=shuffle)
    work = []
    for start in (1_000, 10_000):  # batches of 4 consumed: 62 and 625 passes over the 64 samples
        stream = ShardStream(urls, 4, shuffle_buffer=shuffle)
        stream.start_batch = start
        images, _ = next(iter(stream))
        e, j = divmod(start * 4, 64)
        assert sample_ids(images) == order.pass_ids(e, 0)[j:j + 4].tolist()  # the straight run's batch
        work.append((stream.io["read"] + stream.io["passed"], stream.decoded))
    # 2 tar members (png, cls) per sample: at most one shard passed over plus one block (+1 sample) read
    block = shuffle if shuffle > 1 else 256
    assert all(members <= 2 * (8 + min(block, 64) + 1) and decoded == 4 for members, decoded in work), work


def test_counts_without_a_manifest_match_it(tmp_path):
    folder = make_id_shards(tmp_path / "s", n=30, shard_size=7)
    urls, manifest = resolve_shards(str(folder))
    assert shard_counts(urls) == [s["count"] for s in manifest["shards"]] == [7, 7, 7, 7, 2]
    assert count_samples(f"pipe:cat {urls[0]}") == 7  # a stream: read through, not seeked
    with_counts = stream_batches(urls, 12, counts=[7, 7, 7, 7, 2], shuffle_buffer=5)
    counted = stream_batches(urls, 12, shuffle_buffer=5)
    assert [batch_hash(b) for b in with_counts] == [batch_hash(b) for b in counted]


def test_truncated_shard_leaves_slots_empty_not_shifted(tmp_path, sample_ids):
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=16, shard_size=8)))[0]
    full = [sample_ids(b[0]) for b in stream_batches(urls, 4, shuffle_buffer=0, random_flip=False)]
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[: len(data) // 2])  # the manifest still says 8
    cut = [sample_ids(b[0]) for b in stream_batches(urls, 4, counts=[8, 8], shuffle_buffer=0, random_flip=False)]
    survivors = {i for b in cut for i in b}
    assert set(range(8, 16)) <= survivors and len(survivors) < 16  # shard 0 lost its tail
    assert cut == [[i for i in b if i in survivors] for b in full]  # the lost slots stay empty: nothing shifts


def test_validation_is_finite_ordered_unflipped(tmp_path, sample_ids):
    shards = str(make_id_shards(tmp_path / "s", n=20, shard_size=6))
    dm = ShardDataModule(shards, batch_size=8, num_workers=0, val_shards=shards)
    dm.setup("fit")
    runs = [[i for b in dm.val_dataloader() for i in sample_ids(b[0])] for _ in range(2)]
    assert runs[0] == runs[1] == list(range(20))


@pytest.mark.parametrize("n,world,workers", [(23, 6, 0), (23, 3, 2), (5, 3, 2)])  # 5 < 6 readers: one reads none
def test_validation_reads_every_sample_once_across_readers(tmp_path, n, world, workers, sample_ids):
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=n, shard_size=5)))[0]
    per_rank = []
    for rank in range(world):
        stream = ShardStream(urls, 2, rank=rank, world_size=world, shuffle_buffer=0, random_flip=False,
                             infinite=False)
        per_rank.append([i for b in DataLoader(stream, batch_size=None, num_workers=workers) for i in sample_ids(b[0])])
    assert sorted(i for ids in per_rank for i in ids) == list(range(n))  # each once, none dropped
    if workers == 0:  # one reader per rank: a contiguous run of the stored order, sizes within one
        assert [i for ids in per_rank for i in ids] == list(range(n))
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_pipe_and_http_urls(tmp_path, sample_ids):
    import functools
    import http.server
    import shutil
    import threading

    folder = make_id_shards(tmp_path / "s", n=8, shard_size=8)
    expected = [sample_ids(b[0]) for b in stream_batches([str(folder / "shard-000000.tar")], 5, shuffle_buffer=0)]
    piped = [sample_ids(b[0]) for b in stream_batches([f"pipe:cat {folder}/shard-000000.tar"], 5, shuffle_buffer=0)]
    assert piped == expected  # counted through the pipe, then each pass reopens it at its offset
    if shutil.which("curl") is None:
        pytest.skip("curl is absent: webdataset streams http(s) through curl")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000000}}.tar"
        dm = ShardDataModule(url, batch_size=4, num_workers=0, shuffle_buffer=0, random_flip=False,
                             manifest=f"http://127.0.0.1:{server.server_address[1]}/manifest.json")
        assert dm.num_classes == 3 and dm.image_size == 8
        dm.setup("fit")
        assert [sample_ids(b[0]) for b in dm._stream("train", batch_size=4, infinite=False)] == [[0, 1, 2, 3],
                                                                                               [4, 5, 6, 7]]
        shard = url.replace("{000000..000000}", "000000")
        assert [sample_ids(b[0]) for b in stream_batches([shard], 5, counts=[8], shuffle_buffer=0)] == expected
    finally:
        server.shutdown()


@pytest.mark.parametrize("spec,error,words", [
    ("", UserValueError, ["shards is empty"]),
    ("{tmp}/missing-{{000..001}}.tar", MissingFileError, ["missing-000.tar", "does not exist"]),
    ("{tmp}/nothing-*.tar", MissingFileError, ["nothing-*.tar", "matched no files"]),
    ("{tmp}", MissingFileError, ["has no manifest.json"]),
    ("{tmp}/bad.json", UserValueError, ["bad.json", "not readable JSON"]),
    ("{tmp}/empty.json", UserValueError, ["empty.json", "malformed"]),
    ("builtin:circles", UserValueError, ["builtin:circles", "unknown"]),
    ("builtin:shapes?size=4", UserValueError, ["builtin:shapes?size=4", "size >= 8"]),
    ("val:{tmp}/val.tar", MissingFileError, ["val.tar", "does not exist"]),
])
def test_bad_shards_are_one_line_errors(tmp_path, spec, error, words):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text('{"shards": []}')
    spec = spec.format(tmp=tmp_path)
    if spec.startswith("val:"):  # good training shards, missing val_shards
        dm = ShardDataModule(str(make_id_shards(tmp_path / "s", n=4)), val_shards=spec[4:], num_workers=0)
    else:
        dm = ShardDataModule(spec, num_workers=0)
    with pytest.raises(error) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


# ------------------------------------------------------------------------------ exact resume
class HashRecorder(Recorder):
    """Records a hash of every training batch."""

    def training_step(self, batch, batch_idx):
        self.ids.append(batch_hash(batch))
        return (self.w * batch[0].mean()).sum()

    def validation_step(self, batch, batch_idx):  # never runs (no val_shards); Lightning warns without one
        pass


def fit(shards, workers, max_steps, root, ckpt_path=None, callbacks=(), save=None, accumulate=1) -> list[str]:
    dm = ShardDataModule(shards, batch_size=4, num_workers=workers, shuffle_buffer=16)
    model = HashRecorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accumulate_grad_batches=accumulate)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model.ids


@pytest.mark.slow
@pytest.mark.parametrize("workers,accumulate", [(0, 1), (2, 1), (2, 2)])
def test_lightning_resume_is_exact(tmp_path, workers, accumulate):
    shards, k = str(make_id_shards(tmp_path / "s", n=48, shard_size=6)), accumulate
    straight = fit(shards, workers, 6, tmp_path, accumulate=k)
    # 3 steps, trainer.save_checkpoint, then a new Trainer resumes to 6
    first = fit(shards, workers, 3, tmp_path, save=tmp_path / "half.ckpt", accumulate=k)
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)["ShardDataModule"]
    assert state["batches_consumed"] == 3 * k  # batches, not optimizer steps
    second = fit(shards, workers, 6, tmp_path, ckpt_path=tmp_path / "half.ckpt", accumulate=k)
    assert first + second == straight and len(set(straight)) == 6 * k
    # a checkpoint written by ModelCheckpoint in on_train_batch_end after step 3
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    assert fit(shards, workers, 6, tmp_path, callbacks=[saver], accumulate=k) == straight
    again = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    resumed = fit(shards, workers, 6, tmp_path, ckpt_path=tmp_path / "ck" / "epoch=0-step=3.ckpt", accumulate=k,
                  callbacks=[again])  # the callback that wrote the checkpoint restores its own state
    assert resumed == straight[3 * k:]


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_samples(tmp_path):
    # 2 ranks x 2 workers = 4 readers of 32 positions each of a 128-sample pass; 12 samples per
    # reader are consumed, all within the first pass, so no sample can repeat at all
    shards = make_id_shards(tmp_path / "s", n=128, shard_size=16)
    cmd = [sys.executable, str(WORKERS / "data_ddp.py"), str(shards), str(tmp_path), "2"]
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    ids = [r["ids"] for r in records]
    assert len(ids[0]) == len(ids[1]) == 24 and len(set(ids[0])) == 24 and len(set(ids[1])) == 24
    assert not set(ids[0]) & set(ids[1])
