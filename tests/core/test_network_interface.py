"""The declared network interface (networks/base.py): every preset declares its constructor's values, and what does
not declare it is refused where it enters; the shape checks and fills that read it (training/shapes.py); the
diffusers key tables that import and export both read (interop/diffusers/keys.py).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.interop.diffusers.export import constructor_arguments
from diffusion_pl.interop.diffusers.keys import DIT_KEYS, UNET_KEYS, KeyRow, KeyTable
from diffusion_pl.interop.safetensors import load_exported
from diffusion_pl.networks.base import ScoreNetwork, check_score_network
from diffusion_pl.networks.embeddings import ClassEmbedding
from diffusion_pl.networks.presets import PRESETS
from diffusion_pl.networks.unet_presets import unet_ddpm_cifar10, unet_tiny
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.training.shapes import check_data_fits
from diffusion_pl.training.shapes import (DataShape, check_augment_labels, check_network_fits, network_fill,
                                          network_mismatch)
from diffusion_pl.utils.errors import UserValueError

SHAPES = "builtin:shapes?size=8&count=16"  # RGB 8x8, 5 classes

VARIANTS = {
    "defaults": dict(img_resolution=16),
    "latent-learned-variance-classes-augment": dict(img_resolution=16, in_channels=4, out_channels=8, num_classes=10,
                                                   augment_dim=9),
}


def one_line_refusal(build, *words: str) -> None:
    with pytest.raises(UserValueError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message and all(word in message for word in words), message


# -- the interface: declared by every preset, with its constructor's values ------------------------------------------

@pytest.mark.parametrize("kwargs", VARIANTS.values(), ids=VARIANTS)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda preset: preset.__name__)
def test_every_preset_declares_its_constructor_values(preset, kwargs):
    with torch.device("meta"):  # DiT-XL/2 included: no memory, no initialisation cost
        net = preset(**kwargs)
    assert isinstance(net, ScoreNetwork) and check_score_network(net) is net
    # the arguments the preset hands the class's constructor, defaults included
    args = constructor_arguments({"class_path": f"{preset.__module__}.{preset.__name__}", "init_args": kwargs},
                                 type(net))
    channels = 3 if args["in_channels"] is None else args["in_channels"]
    out_channels = channels if args["out_channels"] is None else args["out_channels"]
    classes, size = args["num_classes"], args["img_resolution"]
    null = classes if classes is not None and args.get("class_null_row", True) else None  # ADM's table has none
    assert (net.img_resolution, net.in_channels, net.out_channels, net.num_classes, net.null_label,
            net.augment_dim) == (size, channels, out_channels, classes, null, args["augment_dim"])
    assert net.image_shape == (channels, size, size)
    assert net.learned_variance == (out_channels == 2 * channels)
    # the layers take and give what is declared
    tables = [m for m in net.modules() if isinstance(m, ClassEmbedding)]
    assert [t.table.num_embeddings for t in tables] == ([] if classes is None else [classes + (null is not None)])
    assert all(t.null_label == null for t in tables)
    with torch.device("meta"):
        x, t = torch.zeros(2, channels, size, size), torch.ones(2)
        labels = None if classes is None else torch.zeros(2, dtype=torch.long)
        augment = torch.zeros(2, net.augment_dim) if net.augment_dim else None
        assert net(x, t, labels, augment_labels=augment).shape == (2, out_channels, size, size)
        with pytest.raises(RuntimeError):  # the input layer takes in_channels, no other count
            net(torch.zeros(2, channels + 1, size, size), t, labels)
        if net.augment_dim:
            with pytest.raises(RuntimeError):
                net(x, t, labels, augment_labels=torch.zeros(2, net.augment_dim + 1))
        if classes is not None and null is None:
            with pytest.raises(UserValueError, match="no null label"):
                net(x, t, None)
        else:  # the null label (or no labels at all) needs no class_labels
            assert net(x, t, None).shape == (2, out_channels, size, size)


class DuckNet(nn.Module):
    """Every declared attribute, but not declared: the interface is a base class, not a set of names."""

    def __init__(self) -> None:
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = 8, 3, 3
        self.num_classes = self.null_label = None
        self.augment_dim = 0
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_label, class_labels=None):
        return self.weight * x


@pytest.mark.parametrize("net", [nn.Identity(), DuckNet()], ids=["Identity", "DuckNet"])
def test_a_network_without_the_interface_is_refused_where_it_enters(net):
    name = type(net).__qualname__
    one_line_refusal(lambda: DiffusionModule(net, VPLinear()), f"net {type(net).__module__}.{name}",
                     "declares no network interface", "diffusion_pl.networks.base.ScoreNetwork")


def test_an_export_whose_net_has_no_interface_is_refused(tmp_path):
    from safetensors.torch import save_file

    components = {"net": "torch.nn.Identity", "process": "diffusion_pl.processes.variance_preserving.VPLinear",
                  "prediction": "diffusion_pl.prediction.EpsPrediction"}
    metadata = {"format": "pt", "export_format": "1", "weights": "ema", "diffusion_pl_version": "0",
                "source_checkpoint_sha256": "0", "global_step": "0",
                **{key: json.dumps({"class_path": path, "init_args": {}}) for key, path in components.items()}}
    save_file({"unused": torch.zeros(1)}, str(tmp_path / "model.safetensors"), metadata=metadata)
    one_line_refusal(lambda: load_exported(tmp_path), "metadata net torch.nn.modules.linear.Identity",
                     "declares no network interface")


@pytest.mark.parametrize("kwargs, words", [
    (dict(img_resolution=None), ("img_resolution is not set", "expected the side")),
    (dict(img_resolution=0), ("img_resolution=0", "positive integer")),
    (dict(img_resolution=8, in_channels=0), ("in_channels=0", "positive integer")),
    (dict(img_resolution=8, out_channels=-3), ("out_channels=-3", "positive integer")),
    (dict(img_resolution=8, num_classes=0), ("num_classes=0", "positive integer or None")),
    (dict(img_resolution=8, num_classes=True), ("num_classes=True", "positive integer or None")),
    (dict(img_resolution=8, augment_dim=-1), ("augment_dim=-1", ">= 0")),
], ids=lambda value: str(value) if isinstance(value, dict) else "")
def test_declared_values_are_checked_once_for_every_network(kwargs, words):
    one_line_refusal(lambda: ScoreNetwork(**kwargs), "ScoreNetwork:", *words)


def test_the_declared_defaults():
    net = ScoreNetwork(img_resolution=8, num_classes=4)
    assert (net.in_channels, net.out_channels, net.null_label, net.augment_dim) == (3, 3, 4, 0)
    assert ScoreNetwork(8, 2, num_classes=4, class_null_row=False).null_label is None
    assert ScoreNetwork(8, 2, 4).learned_variance and not ScoreNetwork(8, 2, 2).learned_variance


# -- the shape checks and fills -------------------------------------------------------------------------------------

def tiny(**kwargs) -> ScoreNetwork:
    return unet_tiny(**{"img_resolution": 8, "model_channels": 8, "channel_mult": (1,), "attn_resolutions": (),
                        **kwargs})


def test_data_shape_of_a_datamodule():
    data = DataShape.of(ShardDataModule(shards=SHAPES, batch_size=4, num_workers=0))
    assert data == DataShape(channels=3, size=(8, 8), num_classes=5, labelled_known=True, name="ShardDataModule")
    # without the attributes nothing is known; size=False leaves output_size (which may read an image) alone
    assert DataShape.of(object()) == DataShape(name="object")
    unread = SimpleNamespace(channels=1, num_classes=None)
    unread_size = type("Lazy", (), {"output_size": property(lambda self: pytest.fail("output_size was read"))})
    assert DataShape.of(unread) == DataShape(channels=1, labelled_known=True, name="SimpleNamespace")
    assert DataShape.of(unread_size(), size=False).size is None


@pytest.mark.parametrize("net, data, words", [
    (tiny(in_channels=1), DataShape(channels=3), ("UNet in_channels=1", "3-channel images", "in_channels: 3")),
    (tiny(), DataShape(size=(16, 16)), ("img_resolution=8x8", "yields 16x16", "image_size: 8")),
    (tiny(num_classes=4), DataShape(num_classes=5, labelled_known=True), ("num_classes=4", "has 5 classes")),
    (tiny(num_classes=4), DataShape(labelled_known=True, name="Folder"), ("num_classes=4", "Folder has no class")),
], ids=["channels", "size", "classes", "no labels"])
def test_data_the_network_does_not_take_is_refused(net, data, words):
    one_line_refusal(lambda: check_network_fits(net, data), *words)


def test_data_the_network_takes_or_that_says_nothing_passes():
    net = tiny(num_classes=5)
    check_network_fits(net, DataShape(channels=3, size=(8, 8), num_classes=5, labelled_known=True))
    check_network_fits(net, DataShape())  # nothing known: nothing checked
    check_network_fits(net, DataShape(num_classes=None, labelled_known=False))  # labels not known: not checked
    check_network_fits(tiny(), DataShape(num_classes=5, labelled_known=True))  # unconditional: labels ignored


def test_check_data_fits_reads_the_datamodule_through_the_shapes():
    data = ShardDataModule(shards=SHAPES, batch_size=4, num_workers=0)
    check_data_fits(tiny(num_classes=5), data)
    one_line_refusal(lambda: check_data_fits(tiny(img_resolution=16), data), "img_resolution=16x16", "8x8")
    one_line_refusal(lambda: check_data_fits(tiny(num_classes=3), data), "num_classes=3", "5 classes")


def test_network_fill_gives_the_unset_options_from_the_data():
    data = DataShape(channels=1, size=(8, 8))
    assert network_fill(["in_channels", "img_resolution"], data) == {"in_channels": 1, "img_resolution": 8}
    assert network_fill(["img_resolution"], data) == {"img_resolution": 8}
    assert network_fill(["in_channels", "img_resolution"], DataShape()) == {}
    one_line_refusal(lambda: network_fill(["img_resolution"], DataShape(size=(8, 6))), "8x6", "square")


def test_augmentation_labels_must_match_augment_dim():
    check_augment_labels(tiny(augment_dim=9), 9)
    one_line_refusal(lambda: check_augment_labels(tiny(augment_dim=0), 9), "gives 9 augmentation labels",
                     "augment_dim=0", "augment_dim: 9")


def test_network_mismatch_names_the_first_difference():
    net = tiny(num_classes=5)
    assert network_mismatch(net, tiny(num_classes=5, model_channels=16)) is None  # the width is not a shape
    assert network_mismatch(net, tiny(img_resolution=16, num_classes=5)) == (
        "image shape (channels, resolution)", (3, 8), (3, 16))
    assert network_mismatch(net, tiny(in_channels=4, num_classes=5))[0] == "image shape (channels, resolution)"
    assert network_mismatch(net, tiny()) == ("num_classes", 5, None)


# -- one key table per diffusers network, both directions ----------------------------------------------------------

def test_the_unet_table_writes_diffusers_own_names_and_reads_them_back():
    diffusers = pytest.importorskip("diffusers")
    from tests.support.interop import DDPM_CIFAR10

    with torch.device("meta"):
        ours, theirs = unet_ddpm_cifar10().state_dict(), diffusers.UNet2DModel(**DDPM_CIFAR10).state_dict()
    exported, unmatched = UNET_KEYS.to_theirs(ours)
    assert not unmatched and {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in theirs.items()}
    back, unmatched = UNET_KEYS.to_ours(exported)
    assert not unmatched and {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}


def test_the_dit_table_round_trips_every_tensor(dit_reference):
    pytest.importorskip("diffusers")

    theirs = dit_reference().state_dict()
    ours, unmatched = DIT_KEYS.to_ours(theirs)
    assert not unmatched and len(ours) < len(theirs)  # q, k, v fused; the per-block embedder copies kept once
    back, unmatched = DIT_KEYS.to_theirs(ours, copies={"block": range(2)})
    assert not unmatched and back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_one_row_serves_both_directions():
    """Without its row a layer is unknown to import and to export alike (they read the same table)."""
    table = KeyTable("diffusers UNet2DModel", [row for row in UNET_KEYS.rows if row.ours != "conv_out"])
    with torch.device("meta"):
        ours = unet_tiny(img_resolution=8, model_channels=32, channel_mult=(1,), attn_resolutions=()).state_dict()
    exported, unmatched = table.to_theirs(ours)
    assert unmatched == ["conv_out.weight", "conv_out.bias"]
    _, unmatched = table.to_ours({**exported, "conv_out.weight": ours["conv_out.weight"]})
    assert unmatched == ["conv_out.weight"]


def test_fused_parts_and_copies_are_refused_when_incomplete_or_unequal():
    table = KeyTable("a net", [KeyRow("b.{block}.emb", "emb"), KeyRow("b.{block}.q", "b.{block}.qkv", part=0),
                               KeyRow("b.{block}.k", "b.{block}.qkv", part=1)])
    ones = torch.ones(2)
    ours, _ = table.to_ours({"b.0.emb.w": ones, "b.1.emb.w": ones, "b.0.q.w": ones, "b.0.k.w": 2 * ones})
    assert torch.equal(ours["b.0.qkv.w"], torch.tensor([1.0, 1.0, 2.0, 2.0])) and torch.equal(ours["emb.w"], ones)
    assert table.to_theirs(ours, copies={"block": [0, 1]})[0].keys() == {"b.0.emb.w", "b.1.emb.w", "b.0.q.w",
                                                                          "b.0.k.w"}
    one_line_refusal(lambda: table.to_ours({"b.0.q.w": ones}), "a net weights hold 1 of the 2 parts", "b.0.qkv.w")
    one_line_refusal(lambda: table.to_ours({"b.1.emb.w": ones, "b.0.emb.w": 2 * ones}),
                     "a net block 1's b.1.emb.w differs from block 0's", "identical per-block copies")
