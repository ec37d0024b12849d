"""Latent data: ADM's centre crop, `prepare --encode` (deterministic, its manifest), and latent shards streamed
like image shards (DDP split, resume, corrupt samples, the flipped encoding for flipped slots)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pl.data.writer import Sample, write_shards
from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.data.stream import ShardStream
from diffusion_pl.data.shards import resolve_shards
from diffusion_pl.data.crop import adm_center_crop
from diffusion_pl.data.stream import ResumableLoader
from diffusion_pl.data.latents import LatentEncoder, npy_bytes
from diffusion_pl.data.png import encode_png
from diffusion_pl.cli.prepare import main as prepare_main
from diffusion_pl.utils.errors import UserValueError
from tests.support.latent import TINY_VAE_CONFIG
from tests.support.paths import WORKERS, repo_pythonpath

pytest.importorskip("diffusers")
ENCODE = json.dumps({"config": TINY_VAE_CONFIG, "seed": 0})
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def ae(tiny_autoencoder):
    return tiny_autoencoder()


def noise(i: int, size=(16, 16)) -> np.ndarray:
    """A seeded uint8 (H, W, 3) noise image: not symmetric, so its flip encodes differently."""
    return np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def samples(n: int, ids_as_labels=False):
    return [Sample(f"{i:08d}", encode_png(noise(i)), "png", i if ids_as_labels else i % 3) for i in range(n)]


def latent_shards(out: Path, ae, n=24, shard_size=6, flips=True, ids_as_labels=False, batch_size=4,
                  images=False) -> Path:
    encoder = LatentEncoder(ae, batch_size=batch_size, device="cpu", flips=flips, images=images)
    classes = [str(i) for i in range(n)] if ids_as_labels else ["a", "b", "c"]
    write_shards(samples(n, ids_as_labels), out, classes=classes, shard_size=shard_size, records=encoder.records,
                 meta=encoder.manifest_fields)
    return out


def stream_batches(urls, n, *, workers=0, start=0, **kwargs) -> list:
    stream = ShardStream(urls, kwargs.pop("batch_size", 4), **kwargs)
    it = iter(ResumableLoader(stream, lambda: start, num_workers=workers))
    return [next(it) for _ in range(n)]


def digest(batch) -> str:
    return hashlib.sha256(batch[0].numpy().tobytes() + batch[1].numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------ ADM centre crop
@pytest.mark.parametrize("size,n,halvings", [((1000, 750), 64, 3), ((750, 1000), 64, 3), ((256, 256), 64, 2),
                                             ((255, 256), 64, 1), ((100, 40), 32, 0), ((20, 30), 32, 0)])
def test_center_crop_size_and_box_halvings(size, n, halvings):
    # halving while the short side >= 2N = 128: 750 -> 375 -> 187 -> 93; 256 -> 128 -> 64; 255 -> 127; 40, 20: none
    out, count = adm_center_crop(Image.fromarray(noise(0, size)), n)
    assert out.size == (n, n) and count == halvings


def test_center_crop_steps():
    image = Image.fromarray(noise(1, (64, 96)))  # W 64, H 96
    # 2N x 3N: one BOX halving to 32 x 48 (the short side is then N: bicubic keeps it), centre rows 8..40
    out, _ = adm_center_crop(image, 32)
    half = np.asarray(image.resize((32, 48), Image.BOX))
    assert np.array_equal(np.asarray(out), half[8:40])
    # and the BOX halving is the 2x2 block mean (to PIL's fixed-point rounding)
    blocks = np.asarray(image, np.float64).reshape(48, 2, 32, 2, 3).mean((1, 3))
    assert np.abs(half - blocks).max() <= 1
    # between N and 2N: bicubic to short side N, long side round(48 * 32 / 40) = 38, offset (38 - 32) // 2 = 3
    image = Image.fromarray(noise(2, (48, 40)))
    expected = image.resize((38, 32), Image.BICUBIC).crop((3, 0, 35, 32))
    assert np.array_equal(np.asarray(adm_center_crop(image, 32)[0]), np.asarray(expected))
    # an N x N image is unchanged; a constant image stays constant
    assert np.array_equal(np.asarray(adm_center_crop(image.crop((0, 0, 32, 32)), 32)[0]),
                          np.asarray(image.crop((0, 0, 32, 32))))
    flat = Image.new("RGB", (517, 389), (10, 200, 77))
    assert (np.asarray(adm_center_crop(flat, 48)[0]) == [10, 200, 77]).all()


def test_prepare_folder_center_crop(tmp_path, capsys):
    for i, (w, h) in enumerate([(50, 40), (33, 70), (16, 16), (120, 90)]):
        (tmp_path / "tree" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(i, (w, h))).save(tmp_path / "tree" / "c" / f"{i}.jpg")
    assert prepare_main(["folder", str(tmp_path / "tree"), "--out", str(tmp_path / "o"), "--center_crop", "16"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["image_size"] == [16, 16] and not manifest["mixed_sizes"] and manifest["image_format"] == ["png"]
    assert manifest["center_crop"] == {"size": 16, "method": "adm"}
    with tarfile.open(tmp_path / "o" / "shard-000000.tar") as tf:
        first = next(m for m in tf.getmembers() if m.name.endswith(".png"))
        stored = np.asarray(Image.open(io.BytesIO(tf.extractfile(first).read())))
    crops = [np.asarray(adm_center_crop(Image.open(p).convert("RGB"), 16)[0])  # the stored one is one of these
             for p in sorted((tmp_path / "tree" / "c").iterdir())]
    assert manifest["count"] == 4 and any(np.array_equal(stored, c) for c in crops)
    assert prepare_main(["folder", str(tmp_path / "tree"), "--out", str(tmp_path / "p"), "--center_crop", "0"]) == 2
    assert "--center_crop 0 is invalid" in capsys.readouterr().err


# ------------------------------------------------------------------------------ prepare --encode
def test_prepare_encode_is_deterministic_and_records_the_autoencoder(tmp_path, ae):
    tree = tmp_path / "tree"
    for i in range(7):
        (tree / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(i, (24, 20))).save(tree / f"c{i % 2}" / f"{i}.png")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert prepare_main(["folder", str(tree), "--out", str(out), "--center_crop", "16", "--encode", ENCODE,
                             "--batch_size", "3", "--accelerator", "cpu", "--shard_size", "4"]) == 0
    tars = [sorted(out.glob("*.tar")) for out in outs]
    assert len(tars[0]) == 2 and [p.read_bytes() for p in tars[0]] == [p.read_bytes() for p in tars[1]]
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert (outs[0] / "manifest.json").read_bytes() == (outs[1] / "manifest.json").read_bytes()
    assert manifest["autoencoder"] == ae.spec() and manifest["image_size"] == [16, 16]
    assert manifest["latent"] == {"shape": [4, 8, 8], "dtype": "float16", "stats": ["mean", "std"], "flip": True,
                                  "members": ["latent.npy", "latent_flip.npy"], "images": False}
    assert manifest["center_crop"]["size"] == 16 and manifest["count"] == 7
    assert [s["sha256"] for s in manifest["shards"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in tars[0]]
    # each record: the raw posterior of the crop and of its mirror image, float16 (2, C, h, w)
    with tarfile.open(tars[0][0]) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert sorted(members)[:3] == ["00000000.cls", "00000000.latent.npy", "00000000.latent_flip.npy"]
    latent = np.load(io.BytesIO(members["00000000.latent.npy"]))
    flipped = np.load(io.BytesIO(members["00000000.latent_flip.npy"]))
    assert latent.dtype == np.float16 and latent.shape == (2, 4, 8, 8)
    images = torch.from_numpy(np.stack([np.asarray(adm_center_crop(Image.open(p), 16)[0])
                                        for p in sorted(tree.rglob("*.png"))])).permute(0, 3, 1, 2) / 127.5 - 1
    posteriors = [torch.stack(ae.encode(x), 1) for x in (images, images.flip(-1))]
    match = [i for i in range(7) if torch.allclose(torch.from_numpy(latent).float(), posteriors[0][i], atol=2e-3)]
    assert len(match) == 1  # the raw (unscaled) mean and std of exactly one of the images
    assert torch.allclose(torch.from_numpy(flipped).float(), posteriors[1][match[0]], atol=2e-3)
    assert not np.allclose(flipped, latent[..., ::-1], atol=1e-2)  # a flipped latent is not the flip's latent


def test_prepare_encode_refusals_are_one_line(tmp_path, capsys):
    tree = tmp_path / "tree" / "c"
    tree.mkdir(parents=True)
    for i, size in enumerate([(16, 16), (15, 15)]):
        Image.fromarray(noise(i, size)).save(tree / f"{i}.png")
    runs = [(["--no_flips"], "--no_flips is given without --encode"),
            (["--keep_images"], "--keep_images is given without --encode"),
            (["--encode", ENCODE, "--mixed_sizes"], "--mixed_sizes is given with --encode"),
            (["--encode", '{"config": {"nope": 1}}'], "autoencoder config is invalid"),
            (["--encode", "{not json"], "is not valid JSON"),
            (["--encode", ENCODE, "--center_crop", "15"], "not a multiple of the autoencoder's downsampling"),
            (["--encode", ENCODE], "images differ in size")]
    for k, (flags, words) in enumerate(runs):
        assert prepare_main(["folder", str(tmp_path / "tree"), "--out", str(tmp_path / f"o{k}"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / f"o{k}").exists()


# ------------------------------------------------------------------------------ streaming latent shards
def test_latent_batches_are_mean_and_std_raw(tmp_path, ae):
    shards = latent_shards(tmp_path / "s", ae, n=8)
    dm = ShardDataModule(str(shards), batch_size=8, num_workers=0, shuffle_buffer=0, random_flip=False)
    dm.setup("fit")
    assert (dm.channels, dm.output_size, dm.image_size, dm.pixel_size) == (4, (8, 8), 8, (16, 16))
    assert dm.autoencoder_spec == ae.spec() and dm.latent["flip"] and dm.latent_shape == (4, 8, 8)
    assert dm.num_classes == 3
    write_shards(samples(4), tmp_path / "i", classes=["a", "b", "c"])
    image_dm = ShardDataModule(str(tmp_path / "i"))
    assert image_dm.latent is None and image_dm.latent_shape is None and image_dm.autoencoder_spec is None
    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 8, 8, 8) and x.dtype == torch.float32 and labels.dtype == torch.int64
    images = torch.from_numpy(np.stack([noise(i) for i in range(8)])).permute(0, 3, 1, 2) / 127.5 - 1
    mean, std = ae.encode(images)
    keys = [int(k) for k in labels]  # labels are i % 3: find each row's sample by its values
    for row, label in zip(x, keys):
        i = min(range(8), key=lambda j: (row[:4] - mean[j]).abs().max().item())
        assert i % 3 == label and torch.allclose(row, torch.cat([mean[i], std[i]]), atol=2e-3)


def test_flipped_slots_read_the_flipped_encoding(tmp_path, ae):
    # image shards and latent shards of the same images stream in the same order with the same flips:
    # each latent row is the encoding of the (possibly flipped) image in the same place of the image stream
    n, kw = 24, {"shuffle_buffer": 6, "random_flip": True, "seed": 3}
    write_shards(samples(n), tmp_path / "img", classes=["a", "b", "c"], shard_size=6)
    latents = resolve_shards(str(latent_shards(tmp_path / "lat", ae, n=n)))[0]
    images = resolve_shards(str(tmp_path / "img"))[0]
    lat = stream_batches(latents, 6, latent_shape=(4, 8, 8), **kw)
    img = stream_batches(images, 6, **kw)
    x = torch.cat([b[0] for b in lat])
    pixels = torch.cat([b[0] for b in img])
    assert torch.equal(torch.cat([b[1] for b in lat]), torch.cat([b[1] for b in img]))
    assert torch.allclose(x, torch.cat(ae.encode(pixels), 1), atol=2e-3)
    unflipped = torch.cat([b[0] for b in stream_batches(latents, 6, latent_shape=(4, 8, 8), **{**kw, "random_flip":
                                                                                                   False})])
    flipped_rows = [(a - b).abs().max() > 1e-2 for a, b in zip(x, unflipped)]
    assert 0.2 < sum(flipped_rows) / len(flipped_rows) < 0.8


def test_prepare_keep_images_stores_each_crop_beside_its_latents(tmp_path):
    tree = tmp_path / "tree" / "c"
    tree.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(noise(i, (24, 20))).save(tree / f"{i}.png")
    out = tmp_path / "out"
    assert prepare_main(["folder", str(tmp_path / "tree"), "--out", str(out), "--center_crop", "16", "--encode",
                         ENCODE, "--accelerator", "cpu", "--keep_images"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latent"]["images"] is True and manifest["latent"]["shape"] == [4, 8, 8]
    with tarfile.open(next(out.glob("*.tar"))) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    crops = sorted(np.asarray(adm_center_crop(Image.open(p), 16)[0]).tobytes() for p in sorted(tree.glob("*.png")))
    kept = sorted(np.asarray(Image.open(io.BytesIO(members[f"{i:08d}.png"]))).tobytes() for i in range(3))
    assert kept == crops and all(f"{i:08d}.latent.npy" in members for i in range(3))


def test_kept_images_stream_flipped_with_their_latents(tmp_path, ae):
    # the images kept beside the latents come as a third element, in the image stream's order and with its flips,
    # and each batch's latents are the encodings of exactly those images
    n, kw = 24, {"shuffle_buffer": 6, "random_flip": True, "seed": 3}
    write_shards(samples(n), tmp_path / "img", classes=["a", "b", "c"], shard_size=6)
    latents = resolve_shards(str(latent_shards(tmp_path / "lat", ae, n=n, images=True)))[0]
    lat = stream_batches(latents, 6, latent_shape=(4, 8, 8), latent_images=True, **kw)
    img = stream_batches(resolve_shards(str(tmp_path / "img"))[0], 6, **kw)
    assert all(len(b) == 3 for b in lat)
    kept, pixels = torch.cat([b[2] for b in lat]), torch.cat([b[0] for b in img])
    assert kept.shape == (24, 3, 16, 16) and torch.equal(kept, pixels)
    assert torch.allclose(torch.cat([b[0] for b in lat]), torch.cat(ae.encode(kept), 1), atol=2e-3)
    assert len(stream_batches(latents, 1, latent_shape=(4, 8, 8), **kw)[0]) == 2  # asked for: (latents, labels)


def test_latent_images_needs_shards_that_keep_them(tmp_path, ae):
    plain = str(latent_shards(tmp_path / "plain", ae, n=6))
    with pytest.raises(UserValueError, match="latent shards .* keep no images: expected shards prepared with"):
        ShardDataModule(plain, latent_images=True).setup("fit")
    write_shards(samples(4), tmp_path / "img", classes=["a", "b", "c"])
    with pytest.raises(UserValueError, match="latent_images=true but .* holds images, not latents"):
        ShardDataModule(str(tmp_path / "img"), latent_images=True).setup("fit")
    with pytest.raises(UserValueError, match="latent_images='yes' is invalid"):
        ShardDataModule(plain, latent_images="yes")
    dm = ShardDataModule(str(latent_shards(tmp_path / "kept", ae, n=8, images=True)), batch_size=4, num_workers=0,
                         latent_images=True, val_shards=str(tmp_path / "kept"))
    dm.setup("fit")
    x, labels, images = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 8, 8, 8) and images.shape == (4, 3, 16, 16) and -1 <= images.min() < images.max() <= 1
    assert len(next(iter(dm.val_dataloader()))) == 2  # validation needs no pixels


def test_flip_needs_flipped_encodings_and_latents_are_never_resized(tmp_path, ae):
    shards = str(latent_shards(tmp_path / "s", ae, n=6, flips=False))
    with pytest.raises(UserValueError, match="hold no flipped encodings"):
        ShardDataModule(shards, random_flip=True).setup("fit")
    ShardDataModule(shards, random_flip=False).setup("fit")
    with pytest.raises(UserValueError, match="image_size=8 is given for the latent shards"):
        ShardDataModule(shards, random_flip=False, image_size=8).setup("fit")
    with pytest.raises(UserValueError, match="val_shards .* has no latent manifest"):
        write_shards(samples(4), tmp_path / "img", classes=["a", "b", "c"])
        ShardDataModule(shards, random_flip=False, val_shards=str(tmp_path / "img")).setup("fit")


@pytest.mark.parametrize("workers,start,shuffle,world", [(0, 5, 6, 1), (2, 3, 6, 1), (2, 7, 4, 2), (0, 9, 0, 2)])
def test_resumed_latent_stream_equals_the_uninterrupted_one(tmp_path, ae, workers, start, shuffle, world):
    urls = resolve_shards(str(latent_shards(tmp_path / "s", ae, n=20, shard_size=5)))[0]
    kw = {"workers": workers, "shuffle_buffer": shuffle, "rank": world - 1, "world_size": world,
          "latent_shape": (4, 8, 8)}
    full = [digest(b) for b in stream_batches(urls, 12, **kw)]  # past a pass boundary (5 or 2.5 batches a pass)
    assert [digest(b) for b in stream_batches(urls, 12 - start, start=start, **kw)] == full[start:]


def test_corrupt_latent_sample_is_skipped_and_counted(tmp_path, ae, caplog):
    good = LatentEncoder(ae, device="cpu")
    records = list(good.records(iter(Sample(f"s{i}", encode_png(noise(i)), "png", 0, (16, 16, 3))
                                     for i in range(6))))
    records[2]["latent.npy"] = b"\x93NUMPY garbage"
    records[4]["latent.npy"] = npy_bytes(np.zeros((2, 4, 4, 4), np.float16))  # the wrong shape
    tar = tmp_path / "bad.tar"
    with tarfile.open(tar, "w") as tf:
        for r in records:
            for member, data in r.items():
                if member != "__key__":
                    info = tarfile.TarInfo(f"{r['__key__']}.{member}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    stream = ShardStream([str(tar)], 6, shuffle_buffer=0, random_flip=False, infinite=False,
                         latent_shape=(4, 8, 8))
    with caplog.at_level(logging.WARNING):
        (x, labels), = list(stream)
    assert x.shape == (4, 8, 8, 8) and stream.skipped == 2 and stream.decoded == 4
    lines = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 2 and "'s2'" in lines[0] and "'s4'" in lines[1] and "expected (2, 4, 8, 8)" in lines[1]


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_latent_samples(tmp_path, ae):
    # 2 ranks x 2 workers = 4 readers of 16 positions each of a 64-sample pass; 12 samples per reader are used
    shards = latent_shards(tmp_path / "s", ae, n=64, shard_size=8, ids_as_labels=True, batch_size=16)
    cmd = [sys.executable, str(WORKERS / "data_ddp.py"), str(shards), str(tmp_path), "2", "labels"]
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    assert records[0]["shapes"] == records[1]["shapes"] == ["((8, 8, 8), 'torch.float32', 'torch.int64')"]
    ids = [r["ids"] for r in records]
    assert len(ids[0]) == len(ids[1]) == 24 and len(set(ids[0])) == 24 and len(set(ids[1])) == 24
    assert not set(ids[0]) & set(ids[1])


def test_latent_shards_are_refused_as_fid_reference_images(tmp_path, ae):
    from diffusion_pl.data.reference import reference_images

    with pytest.raises(UserValueError, match="holds latents .* expected image shards"):
        reference_images(str(latent_shards(tmp_path / "s", ae, n=4)))
