"""The Docker image's files (no daemon runs in CI, so the image itself is not built; docs/guide/training.md)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def _ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern of the ignore file wins (`!` re-includes)."""
    lines = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    result = False
    for line in (ln.strip() for ln in lines):
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)) or \
            (pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts))
        if hit:
            result = not negate
    return result


def test_the_ignore_file_is_where_buildkit_reads_it_and_keeps_data_and_runs_out():
    assert not (REPO / "docker" / ".dockerignore").exists()  # Docker reads <context>/.dockerignore, not this
    for path in ("data/cifar10/000000.tar", "runs/quickstart/checkpoints/last.ckpt", ".git/HEAD", ".ci/venv/bin/python",
                 "tests/conftest.py", "diffusion_pl/__pycache__/x.pyc"):
        assert _ignored(path), path
    copied = re.findall(r"^COPY (\S+)", DOCKERFILE, re.M)
    assert copied and all(not _ignored(p) for p in copied), copied
    assert not _ignored("diffusion_pl/training/module.py") and not _ignored("configs/quickstart.yaml")


def test_the_image_installs_the_extras_on_a_base_that_can_compile():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, re.M).group(1)
    assert base.endswith("-devel"), base  # Triton needs a C compiler: torch.compile fails on -runtime bases
    install = re.search(r'pip install "\.\[([\w,]+)\]"', DOCKERFILE).group(1).split(",")
    assert "latent" in install


def test_caches_live_on_a_volume_and_any_user_can_write():
    env = dict(re.findall(r"(\w+)=(\S+)", DOCKERFILE.split("ENV", 1)[1].split("\n\n", 1)[0]))
    volume = re.search(r'^VOLUME \["(\S+)"\]', DOCKERFILE, re.M).group(1)
    for key in ("DIFFUSION_PL_CACHE", "TORCH_HOME", "HF_HOME"):
        assert env[key].startswith(volume + "/"), key
    assert re.search(r"chmod 1777 .*/workspace.*" + re.escape(volume), DOCKERFILE)
    assert '--user "$(id -u):$(id -g)"' in (REPO / "docs" / "guide" / "training.md").read_text()
