"""Bad input meets one line: every probe runs a real command line and expects exit status 2, a last stderr
line `diffusion-pl <command>: error: ...` containing the given words, and no traceback.

A new bad input joins in one line: add a `Probe(...)` to PROBES (the placeholders {config}, {run}, {grey},
{corrupt}, {nomanifest}, {badmanifest}, {junk}, {goodimages}, {badimages}, {userdir}, {afile}, {samples} name the fixture files).
"""

from __future__ import annotations

import errno
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.data.writer import Sample, write_shards
from diffusion_pl.data.png import encode_png
from diffusion_pl.utils.errors import TRACEBACK_ENV
from tests.support.fit import tiny_fit_config
from tests.support.paths import REPO

SHAPES = "builtin:shapes?size=8&count=64"  # RGB 8x8, 5 classes

CONFIG = tiny_fit_config(max_steps=2, logger=False, enable_checkpointing=False)


@dataclass(frozen=True)
class Probe:
    """A command line (placeholders filled from the fixtures) and words its one-line error must contain."""

    name: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]

    def __str__(self) -> str:
        return self.name


def fit(*args: str) -> tuple[str, ...]:
    return ("fit", "--config", "{config}", "--trainer.default_root_dir={run}", *args)


PROBES = [
    # data the run cannot read
    Probe("missing shards", fit("--data.init_args.shards={run}/nowhere.tar"), ("nowhere.tar", "does not exist")),
    Probe("folder without manifest", fit("--data.init_args.shards={nomanifest}"), ("manifest.json",)),
    Probe("corrupt manifest", fit("--data.init_args.shards={badmanifest}"), ("manifest", "JSON")),
    Probe("mistyped builtin", fit("--data.init_args.shards=builtin:shapez"), ("builtin:shapez", "expected")),
    Probe("missing val_shards", fit("--data.init_args.val_shards={run}/val.tar"), ("val.tar", "does not exist")),
    Probe("all samples undecodable", fit("--data.init_args.shards={corrupt}"), ("decod",)),
    Probe("all samples undecodable, workers", fit("--data.init_args.shards={corrupt}", "--data.init_args.num_workers=1"),
          ("decod",)),
    # numeric options
    Probe("batch size 0", fit("--data.init_args.batch_size=0"), ("batch_size", "0")),
    Probe("batch size -4", fit("--data.init_args.batch_size=-4"), ("batch_size", "-4")),
    Probe("negative learning rate", fit("--model.optimizer=torch.optim.Adam", "--model.optimizer.lr=-0.1"),
          ("optimizer", "-0.1")),
    Probe("ema decay above 1", fit("--model.ema_decay=1.5"), ("ema_decay", "1.5")),
    Probe("nonfinite skips 0", fit("--model.max_nonfinite_skips=0"), ("max_nonfinite_skips",)),
    Probe("lr warm-up and lr schedule", fit("--model.lr_warmup_steps=5", "--model.lr_schedule=Cosine"),
          ("lr_warmup_steps is 5 and lr_schedule is Cosine", "expected one of them")),
    Probe("cosine floor above 1", fit("--model.lr_schedule=Cosine", "--model.lr_schedule.min_ratio=2"),
          ("Cosine min_ratio is 2", "[0, 1]")),
    Probe("cosine of an endless run",
          fit("--model.lr_schedule=Cosine", "--trainer.max_steps=-1", "--trainer.max_epochs=-1"),
          ("Cosine has no total_steps", "--trainer.max_steps")),
    # data and network disagree
    Probe("grey data, RGB net", fit("--data.init_args.shards={grey}", "--model.net.init_args.in_channels=3"),
          ("in_channels=3", "1-channel")),
    Probe("8x8 data, 16x16 net", fit("--model.net.init_args.img_resolution=16"), ("img_resolution=16x16", "8x8")),
    Probe("9 classes for 5", fit("--model.net.init_args.num_classes=9"), ("num_classes=9", "5 classes")),
    Probe("3 classes for 5", fit("--model.net.init_args.num_classes=3"), ("num_classes=3", "5 classes")),
    # recipes by name
    Probe("unknown recipe name", ("fit", "--config", "quickstrat"), ("--config quickstrat", "quickstart")),
    Probe("a recipe's path outside a clone", ("fit", "--config", "{run}/configs/quickstart.yaml"),
          ("no such file", "--config quickstart")),
    Probe("list: unknown recipe", ("list", "recipes", "quickstrat"), ("no recipe 'quickstrat'", "quickstart")),
    Probe("list: --write over a file", ("list", "recipes", "quickstart", "--write", "{junk}"),
          ("junk.ckpt", "exists", "not overwritten")),
    Probe("list: a name for another category", ("list", "networks", "unet_tiny"), ("list recipes NAME",)),
    # checkpoints
    Probe("missing ckpt_path", fit("--ckpt_path={run}/gone.ckpt"), ("gone.ckpt", "does not exist")),
    Probe("truncated ckpt_path", fit("--ckpt_path={junk}"), ("not a checkpoint",)),
    Probe("sample: random file as ckpt", ("sample", "--ckpt_path", "{junk}", "--num_samples", "1", "--out", "{run}/s"),
          ("not a checkpoint",)),
    Probe("evaluate: random file as ckpt",
          ("evaluate", "--ckpt_path", "{junk}", "--data", SHAPES, "--num_samples", "2",
           "--feature_extractor", "tests.support.evaluation.StandInFeatures"), ("not a checkpoint",)),
    Probe("reconstruct-ema: run without snapshots",
          ("reconstruct-ema", "--run", "{userdir}", "--sigma_rel", "0.07", "--out", "{run}/ema"),
          ("no post-hoc EMA snapshots", "PowerEMA")),
    Probe("reconstruct-ema: sigma_rel out of range",
          ("reconstruct-ema", "--run", "{userdir}", "--sigma_rel", "0.5", "--out", "{run}/ema"),
          ("--sigma_rel 0.5", "out of range")),
    Probe("sample: guidance interval upside down",
          ("sample", "--ckpt_path", "{junk}", "--num_samples", "1", "--guidance", "2", "--guidance_interval", "5", "0.3",
           "--out", "{run}/s"),
          ("--guidance_interval 5 0.3",)),
    Probe("export: missing ckpt", ("export", "--ckpt_path", "{run}/gone.ckpt", "--out", "{run}/e"),
          ("gone.ckpt", "does not exist")),
    Probe("export: random file as ckpt", ("export", "--ckpt_path", "{junk}", "--out", "{run}/e"), ("not a checkpoint",)),
    Probe("export: --out is a file", ("export", "--ckpt_path", "{junk}", "--out", "{junk}"), ("--out", "is a file")),
    Probe("evaluate: --ref_stats not an npz", ("evaluate", "--samples", "{samples}", "--ref_stats", "{junk}",
                                               "--feature_extractor", "tests.support.evaluation.StandInFeatures"),
          ("--ref_stats", "junk.ckpt", "not an npz", "'mu'", "'sigma'")),
    # missing inputs are named before the InceptionV3 weights are looked for (a download, with internet)
    Probe("evaluate: missing --data", ("evaluate", "--ckpt_path", "{junk}", "--data", "{run}/nowhere", "--num_samples", "2"),
          ("--data", "nowhere", "does not exist")),
    Probe("evaluate: missing --ckpt", ("evaluate", "--ckpt_path", "{run}/gone.ckpt", "--data", SHAPES), ("gone.ckpt",)),
    Probe("evaluate: missing --bpd_data", ("evaluate", "--ckpt_path", "{junk}", "--data", SHAPES, "--bpd", "--bpd_data",
                                           "{run}/nowhere"), ("--bpd_data", "nowhere", "does not exist")),
    # prepare
    Probe("prepare: --encode a local folder that is not there",
          ("prepare", "folder", "{goodimages}", "--out", "{run}/shards", "--encode", "./no-such-vae"),
          ("./no-such-vae does not exist",)),
    Probe("prepare: zero-byte image", ("prepare", "folder", "{badimages}", "--out", "{run}/shards"), ("0001.jpg",)),
    Probe("prepare: --overwrite of a folder it did not write",
          ("prepare", "folder", "{goodimages}", "--out", "{userdir}", "--overwrite"), ("not",)),
    # outputs that cannot be written: a file where a folder must go (portable: the permission bits do not stop root)
    Probe("fit: run folder under a file", fit("--trainer.default_root_dir={afile}/run"),
          ("--trainer.default_root_dir", "afile is a file")),
    Probe("export: --out under a file", ("export", "--ckpt", "{junk}", "--out", "{afile}/e"), ("--out", "afile is a file")),
    Probe("export diffusers: --out under a file",
          ("export", "--ckpt", "{junk}", "--out", "{afile}/e", "--format", "diffusers"), ("--out", "afile is a file")),
    Probe("import: --out under a file", ("import", "owner/never-downloaded", "--out", "{afile}/i/x.ckpt"),
          ("--out", "afile is a file")),
    Probe("sample: --out under a file", ("sample", "--ckpt", "{junk}", "--num-samples", "1", "--out", "{afile}/s"),
          ("--out", "afile is a file")),
    Probe("prepare: --out under a file", ("prepare", "folder", "{goodimages}", "--out", "{afile}/shards"),
          ("--out", "afile is a file")),
    # a diverging run
    Probe("nonfinite loss", fit("--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1e30"),
          ("non-finite training loss",)),
    Probe("nonfinite loss, skip forever",
          fit("--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1e30", "--model.nonfinite_loss=skip",
              "--model.max_nonfinite_skips=3", "--trainer.max_steps=50"), ("3 consecutive steps",)),
]


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_inputs")
    grey = np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8)
    write_shards((Sample(f"{i:04d}", encode_png(g), "png", i % 5, (8, 8, 1)) for i, g in enumerate(grey)),
                 root / "grey", classes=[str(c) for c in range(5)], shard_size=8)
    (root / "corrupt").mkdir()
    _tar(root / "corrupt" / "shard-000000.tar",
         {f"{i:04d}.{ext}": data for i in range(8) for ext, data in (("jpg", b"not an image"), ("cls", b"0"))})
    (root / "nomanifest").mkdir()
    _tar(root / "nomanifest" / "shard-000000.tar", {"0000.cls": b"0"})
    (root / "badmanifest").mkdir()
    (root / "badmanifest" / "manifest.json").write_text("{not json")
    (root / "junk.ckpt").write_bytes(b"PK\x03\x04 truncated" + bytes(200))
    for folder, broken in (("goodimages", False), ("badimages", True)):
        (root / folder / "cat").mkdir(parents=True)
        for i in range(2):
            data = b"" if broken and i == 1 else encode_png(np.zeros((8, 8, 3), np.uint8))
            (root / folder / "cat" / f"{i:04d}.jpg").write_bytes(data)
    (root / "afile").write_text("a file, not a folder")
    np.savez(root / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (root / "userdir").mkdir()
    (root / "userdir" / "notes.txt").write_text("mine")
    return {"grey": str(root / "grey"), "corrupt": str(root / "corrupt" / "shard-000000.tar"),
            "nomanifest": str(root / "nomanifest"), "badmanifest": str(root / "badmanifest"),
            "junk": str(root / "junk.ckpt"), "goodimages": str(root / "goodimages"),
            "badimages": str(root / "badimages"), "userdir": str(root / "userdir"), "afile": str(root / "afile"),
            "samples": str(root / "samples.npz")}


@pytest.mark.parametrize("probe", PROBES, ids=str)
def test_bad_input_ends_in_one_line(probe, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.syspath_prepend(str(REPO))  # tests.support.evaluation's stand-in feature extractor
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    values = {**files, "config": str(config), "run": str(tmp_path / "run")}
    argv = [arg.format(**values) for arg in probe.argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"diffusion-pl {argv[0]}: error: "), err[-2000:]
    for word in probe.expect:
        assert word in last, last
    assert "Traceback" not in err, err[-2000:]


def test_a_network_without_the_interface_is_refused_while_parsing(tmp_path, capsys):
    """model.net is typed ScoreNetwork: LightningCLI (jsonargparse) refuses another class before building anything,
    naming the type (DiffusionModule's own check, tests/core/test_network_interface.py, covers Python callers)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--model.net=torch.nn.Identity", "--print_config"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "torch.nn.Identity does not correspond to a subclass of ScoreNetwork" in err, err[-2000:]
    assert "Traceback" not in err


def test_traceback_env_shows_the_traceback(files, tmp_path, monkeypatch):
    """DIFFUSION_PL_TRACEBACK=1: the same user error is raised with its traceback instead of one line."""
    from diffusion_pl.utils.errors import UserError

    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(UserError, match="not a checkpoint"):
        main(["sample", "--ckpt_path", files["junk"], "--num_samples", "1", "--out", str(tmp_path / "s")])


def test_a_full_disk_during_a_checkpoint_save(tmp_path, monkeypatch, capsys):
    """The disk fills up in the middle of writing a checkpoint: one line naming the file and saying to free space,
    and no half-written checkpoint (nor its temporary file) in the checkpoint folder."""
    import torch

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_fit_config(max_steps=2, logger=False)))
    assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffusion-pl fit: error: ") and "Traceback" not in err, err[-2000:]
    assert str(tmp_path / "run" / "checkpoints") in last and ".ckpt" in last and "free space" in last, last
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.mark.slow
def test_resuming_with_a_wider_network_names_the_first_mismatch(tmp_path, monkeypatch, capsys):
    """`fit --ckpt_path last` after the recipe's channel count changed: one line naming the checkpoint, the first
    parameter that differs and both shapes (not one "size mismatch" line per tensor)."""
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_fit_config(max_steps=1, logger=False)))
    run = [f"--config={config}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    assert main(["fit", *run]) == 0
    capsys.readouterr()
    assert main(["fit", *run, "--ckpt_path=last", "--trainer.max_steps=2",
                 "--model.net.init_args.model_channels=16"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffusion-pl fit: error: checkpoint ") and "Traceback" not in err, err[-2000:]
    assert "step=1.ckpt" in last and re.search(r"net\.\S+ is \(\d+, 8\) in the checkpoint and \(\d+, 16\) in "
                                               r"model\.net", last), last


@pytest.mark.slow
def test_a_killed_ddp_peer_is_one_line_on_the_survivor(tmp_path):
    """Rank 1 of a 2-process CPU DDP fit dies mid-training (os._exit, as an out-of-memory kill): rank 0's collective
    fails in gloo; it ends in one line saying a peer died and where to look, not ~100 lines of traceback."""
    import subprocess
    import sys

    config = tmp_path / "config.yaml"
    callbacks = [{"class_path": "tests.support.training.DieOnRank", "init_args": {"rank": 1, "step": 2}}]
    config.write_text(yaml.safe_dump(tiny_fit_config(max_steps=50, logger=False, enable_checkpointing=False,
                                                     devices=2, strategy="ddp", callbacks=callbacks)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(TRACEBACK_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "diffusion_pl", "fit", "--config", str(config),
                           f"--trainer.default_root_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          timeout=400, cwd=REPO, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("diffusion-pl fit: error: another process of this distributed run died"), proc.stderr[-3000:]
    assert "rank 0" in last and "other ranks" in last and "Traceback" not in proc.stderr, proc.stderr[-3000:]
