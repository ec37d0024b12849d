"""diffusers UNet2DModels of any GroupNorm grouping, both ways: small models (block_out_channels (32, 64)) with
norm_num_groups 8, 16 and 32 import with diffusers' outputs, and the quick-start U-Net (configs/quickstart.yaml,
norm_groups=8) exports to a UNet2DModel with its outputs and imports back to itself. Models are built from
configs with random weights (tests/support/interop.py `randomise`: no layer hides behind a zero)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.interop.diffusers.unet import unet_from_diffusers, unet_from_diffusers_state
from diffusion_pl.interop.importer import import_pretrained, write_imported_checkpoint
from diffusion_pl.networks.unet import UNet
from diffusion_pl.training.module import load_module
from diffusion_pl.utils.errors import UserValueError
from tests.support.interop import TIMESTEPS, OurSinusoid, randomise

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

REPO = Path(__file__).resolve().parents[2]
# diffusers' own defaults otherwise: [cos, sin] sinusoid without the endpoint (freq_shift=0), norm_eps 1e-5,
# attention_head_dim 8 (4 heads at 32 channels, 8 in the 64-channel middle), symmetric downsample padding.
NARROW = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"))
CASES = {"groups8": dict(norm_num_groups=8), "groups16": dict(norm_num_groups=16),
         "groups32": dict(norm_num_groups=32, attn_norm_num_groups=32),
         "groups16-emb64": dict(norm_num_groups=16, time_embedding_dim=64)}


def groups(net: torch.nn.Module) -> set[int]:
    return {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}


def reference(config: dict, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: no .to(dtype) cast, which diffusers warns about
    try:
        return randomise(diffusers.UNet2DModel(**config)).eval()
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_narrow_unet2dmodel_imports_with_parity(extra):
    theirs = reference({**NARROW, **extra})
    ours = unet_from_diffusers(theirs)
    assert groups(ours) == groups(theirs) == {extra["norm_num_groups"]}
    x = torch.randn(len(TIMESTEPS), 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = theirs(x, TIMESTEPS).sample  # diffusers' own float32 sinusoid
        assert 0.1 < expected.abs().max() < 1e3
        assert (ours(x, TIMESTEPS) - expected).abs().max() <= 1e-4  # the two float32 sinusoids round apart
        theirs.time_proj = OurSinusoid(ours)  # one shared sinusoid: the network alone, to float64 precision
        assert (ours(x, TIMESTEPS) - theirs(x, TIMESTEPS).sample).abs().max() <= 1e-10


def test_groupings_diffusers_cannot_build_are_refused():
    with pytest.raises(UserValueError, match=r"norm_groups=16 does not divide a GroupNorm of 24 channels"):
        unet_from_diffusers_state({**NARROW, "block_out_channels": (24, 48), "norm_num_groups": 16}, {})
    with pytest.raises(UserValueError, match=r"attn_norm_num_groups=16 is not supported: expected None or "
                                             r"norm_num_groups=8"):
        unet_from_diffusers_state({**NARROW, "norm_num_groups": 8, "attn_norm_num_groups": 16}, {})
    with pytest.raises(UserValueError, match=r"time_embedding_dim=48 is not supported"):
        unet_from_diffusers_state({**NARROW, "time_embedding_dim": 48}, {})


def quickstart_checkpoint(tmp_path: Path, **overrides) -> tuple[str, UNet]:
    """An EDM checkpoint of the quick-start U-Net (its recipe's net at 16x16, 3 channels), every weight random."""
    recipe = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())["model"]
    net_spec = dict(recipe["net"])
    net_spec["init_args"] = {**net_spec["init_args"], "img_resolution": 16, "in_channels": 3, **overrides}
    net = randomise(UNet(**net_spec["init_args"]), seed=3).eval()
    path = write_imported_checkpoint(tmp_path / "quickstart.ckpt", net_spec, recipe["process"], recipe["prediction"],
                                     net.state_dict(), {"source": "test"})
    return str(path), net


def test_quickstart_unet_exports_and_round_trips(tmp_path, capsys):
    ckpt, ours = quickstart_checkpoint(tmp_path)
    assert groups(ours) == {8}
    assert main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "d"), "--format", "diffusers"]) == 0
    assert "no scheduler_config.json: the process EDM" in capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "config.json").read_text())["norm_num_groups"] == 8
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "d").eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    c_noise = torch.tensor([-1.5, -0.3, 0.2, 1.1])  # EDM's noise labels, log(sigma) / 4
    with torch.no_grad():
        expected, out = theirs(x, c_noise).sample, ours(x, c_noise)
    assert expected.abs().max() > 0.1 and (out - expected).abs().max() <= 1e-5
    # and back: the import of the export is the same network, weight for weight
    import_pretrained(str(tmp_path / "d"), tmp_path / "back.ckpt")
    back = load_module(str(tmp_path / "back.ckpt")).ema.eval()
    assert groups(back) == {8}
    assert back.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x, c_noise), out)


def test_mixed_groupings_are_refused_naming_norm_groups(tmp_path, capsys, one_line_error):
    ckpt, _ = quickstart_checkpoint(tmp_path, norm_groups=None)  # the default rule: 8, 16, 24 and 32 groups
    one_line_error(capsys, ["export", "--ckpt", ckpt, "--out", str(tmp_path / "out"), "--format", "diffusers"],
                   "UNet norm_groups=None cannot be exported as diffusers", "[8, 16, 24, 32] groups",
                   "norm_groups set (e.g. 8")
    assert not (tmp_path / "out").exists()
