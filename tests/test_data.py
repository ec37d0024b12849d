"""Contracts of the data layer: prepare (deterministic, atomic, every source), streaming
(format, flip, corrupt samples, rank splitting), exact resume under Lightning, DDP."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
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

from diffusion_pl.data import (SHAPES, Sample, ShardDataModule, ShardStream, ensure_shapes,
                               load_manifest, resolve_shards, write_shards)
from diffusion_pl.data.datamodule import ResumableLoader, tar_samples
from diffusion_pl.data.prepare import encode_png, main as prepare_main

HERE = Path(__file__).resolve().parent
CIFAR_TAR = HERE.parents[1] / "shared" / "data" / "cifar10-jpeg.tar.gz"
sys.path.insert(0, str(HERE))
from _data_ddp_worker import Recorder, sample_ids  # noqa: E402
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
        args = ["folder", str(src), "--split", "train", "--shard-size", "2", "--out", str(tmp_path / out)]
        assert prepare_main(args) == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in shards + ["manifest.json"]:
        assert sha(tmp_path / "a" / name) == sha(tmp_path / "b" / name)


def test_manifest_contents(tmp_path):
    src = make_folder(tmp_path / "src", classes=("zebra", "ant"), n=5)
    assert prepare_main(["folder", str(src), "--split", "train", "--shard-size", "4", "--out", str(tmp_path / "o")]) \
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
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert prepare_main(["folder", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and "--overwrite" in err
    assert prepare_main(["folder", str(src), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


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
    assert prepare_main(["folder", str(CIFAR_TAR), "--split", "train", "--max-samples", "300",
                         "--shard-size", "100", "--out", str(out)]) == 0
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


def test_corrupt_sample_is_skipped_counted_logged(tmp_path, caplog):
    tar = tmp_path / "bad.tar"
    with wds.TarWriter(str(tar), encoder=False) as sink:
        for i in range(6):
            data = b"not an image" if i == 2 else encode_png(np.full((4, 4, 3), i, np.uint8))
            sink.write({"__key__": f"s{i}", "png": data, "cls": b"0"})
    stream = ShardStream([str(tar)], 6, shuffle_buffer=0, random_flip=False, infinite=False)
    with caplog.at_level(logging.WARNING):
        (images, labels), = list(stream)
    assert images.shape[0] == 5 and stream.skipped == 1
    lines = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 1 and "'s2'" in lines[0] and "1 skipped so far" in lines[0]


@pytest.mark.parametrize("n_shards", [8, 1])  # whole shards per reader, or every R-th sample
def test_ranks_and_workers_see_disjoint_samples(tmp_path, n_shards):
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=64, shard_size=64 // n_shards)))[0]
    seen = []
    for rank in (0, 1):
        batches = stream_batches(urls, 4, workers=2, rank=rank, world_size=2, shuffle_buffer=4)
        seen.append([i for b in batches for i in sample_ids(b[0])])
    assert len(set(seen[0])) == len(seen[0]) == 16 and len(set(seen[1])) == 16  # one pass: no repeats
    assert not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("workers,start", [(0, 5), (2, 4), (2, 3)])
def test_stream_fast_forward_matches(tmp_path, workers, start):
    urls = resolve_shards(str(make_id_shards(tmp_path / "s", n=40, shard_size=5)))[0]
    full = [batch_hash(b) for b in stream_batches(urls, 10, workers=workers, shuffle_buffer=16)]
    resumed = [batch_hash(b) for b in stream_batches(urls, 10 - start, workers=workers, start=start, shuffle_buffer=16)]
    assert resumed == full[start:]


def test_validation_is_finite_ordered_unflipped(tmp_path):
    shards = str(make_id_shards(tmp_path / "s", n=20, shard_size=6))
    dm = ShardDataModule(shards, batch_size=8, num_workers=0, val_shards=shards)
    dm.setup("fit")
    runs = [[i for b in dm.val_dataloader() for i in sample_ids(b[0])] for _ in range(2)]
    assert runs[0] == runs[1] == list(range(20))


def test_pipe_and_http_urls(tmp_path):
    import functools
    import http.server
    import shutil
    import threading

    folder = make_id_shards(tmp_path / "s", n=8, shard_size=8)
    expected = [sample_ids(b[0]) for b in stream_batches([str(folder / "shard-000000.tar")], 2, shuffle_buffer=0)]
    piped = [sample_ids(b[0]) for b in stream_batches([f"pipe:cat {folder}/shard-000000.tar"], 2, shuffle_buffer=0)]
    assert piped == expected
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
        assert [sample_ids(b[0]) for b in dm._stream("train", batch_size=4, infinite=False)] == expected
    finally:
        server.shutdown()


@pytest.mark.parametrize("spec,words", [
    ("", ["shards is empty"]),
    ("{tmp}/missing-{{000..001}}.tar", ["missing-000.tar", "does not exist"]),
    ("{tmp}/nothing-*.tar", ["nothing-*.tar", "matched no files"]),
    ("{tmp}", ["has no manifest.json"]),
    ("{tmp}/bad.json", ["bad.json", "not readable JSON"]),
    ("{tmp}/empty.json", ["empty.json", "malformed"]),
    ("builtin:circles", ["builtin:circles", "unknown"]),
])
def test_bad_shards_are_one_line_errors(tmp_path, spec, words):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text('{"shards": []}')
    dm = ShardDataModule(spec.format(tmp=tmp_path), num_workers=0)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


# ------------------------------------------------------------------------------ exact resume
class HashRecorder(Recorder):
    """Records a hash of every training batch."""

    def training_step(self, batch, batch_idx):
        self.ids.append(batch_hash(batch))
        return (self.w * batch[0].mean()).sum()


def fit(shards, workers, max_steps, root, ckpt_path=None, callbacks=(), save=None, accumulate=1) -> list[str]:
    dm = ShardDataModule(shards, batch_size=4, num_workers=workers, shuffle_buffer=16)
    model = HashRecorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accumulate_grad_batches=accumulate)
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
    resumed = fit(shards, workers, 6, tmp_path, ckpt_path=tmp_path / "ck" / "epoch=0-step=3.ckpt", accumulate=k)
    assert resumed == straight[3 * k:]


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_samples(tmp_path):
    # 2 ranks x 2 workers = 4 readers of 2 shards (32 samples) each; 12 samples per reader
    # are consumed, fewer than 32 - shuffle_buffer, so no sample can repeat within a rank
    shards = make_id_shards(tmp_path / "s", n=128, shard_size=16)
    cmd = [sys.executable, str(HERE / "_data_ddp_worker.py"), str(shards), str(tmp_path), "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    ids = [r["ids"] for r in records]
    assert len(ids[0]) == len(ids[1]) == 24 and len(set(ids[0])) == 24 and len(set(ids[1])) == 24
    assert not set(ids[0]) & set(ids[1])
