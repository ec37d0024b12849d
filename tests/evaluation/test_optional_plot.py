"""matplotlib is optional: without it the post-hoc EMA sweep writes its CSV and no plot (the `plot` extra)."""

from __future__ import annotations

import sys

from diffusion_pl.evaluation.ema_sweep import write_plot

ROWS = [{"sigma_rel": 0.05, "fid/heun": 3.0}, {"sigma_rel": 0.10, "fid/heun": 2.5}]


def test_the_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert write_plot(tmp_path / "sweep.png", ROWS, "FID") is False
    assert not (tmp_path / "sweep.png").exists()


def test_the_plot_is_written_with_matplotlib(tmp_path):
    assert write_plot(tmp_path / "sweep.png", ROWS, "FID") is True
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
