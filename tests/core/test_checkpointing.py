"""Activation checkpointing of the UNet and DiT blocks (`checkpoint_activations=True`,
diffusion_pl/networks/checkpointing.py): the same outputs and gradients as without it, dropout included,
less memory kept for the backward pass, the same state_dict, and inactive outside training."""

from __future__ import annotations

import pytest
import torch

from diffusion_pl.networks import checkpointing
from diffusion_pl.networks.dit import dit_tiny, lightningdit_b_1
from diffusion_pl.networks.unet import UNet
from diffusion_pl.utils.errors import UserValueError

UNETS = {
    # DDPM's convolutional resampling, attention at 8x8, dropout
    "ddpm": dict(channel_mult=(1, 2), attn_resolutions=(8,), dropout=0.3, resample="conv", init="ddpm"),
    # NCSN++: resampling residual blocks with FIR taps and the residual input pyramid, dropout
    "ncsnpp": dict(channel_mult=(1, 2, 2), attn_resolutions=(8,), dropout=0.2, resample="resblock",
                   resample_filter=(1, 3, 3, 1), progressive_input="residual", skip_rescale=True, init="edm"),
}


def randomized(net):
    """`net` with random weights: zero-initialised residual branches and adaLN-Zero gates would leave
    parameters without a gradient and dropout without an effect."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


def small_unet(name: str, checkpoint_activations: bool) -> UNet:
    torch.manual_seed(0)
    return randomized(UNet(img_resolution=16, model_channels=16, num_res_blocks=1, num_classes=3,
                           checkpoint_activations=checkpoint_activations, **UNETS[name]))


def small_dit(checkpoint_activations: bool):
    torch.manual_seed(0)
    return randomized(dit_tiny(16, 3, num_classes=3, checkpoint_activations=checkpoint_activations))


def small_lightningdit(checkpoint_activations: bool):
    """LightningDiT's blocks with every option on: the rotary table is an argument of each checkpointed block."""
    torch.manual_seed(0)
    return randomized(lightningdit_b_1(16, 3, num_classes=3, hidden_size=64, depth=2, num_heads=4, qk_norm=True,
                                       adaln_shift=False, checkpoint_activations=checkpoint_activations))


NETS = {**{f"unet-{name}": (lambda ck, name=name: small_unet(name, ck)) for name in UNETS}, "dit": small_dit,
        "lightningdit": small_lightningdit}


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g), torch.rand(4, generator=g) * 1000, torch.tensor([0, 1, 2, 3])


def train_step(net):
    """Output and per-parameter gradients of one training forward/backward, dropout drawn from seed 5."""
    net.train()
    x, t, y = batch()
    torch.manual_seed(5)
    out = net(x, t, y)
    out.square().mean().backward()
    return out.detach(), {name: p.grad for name, p in net.named_parameters()}


def saved_bytes(net) -> int:
    """Bytes of the distinct tensors a training forward keeps for the backward pass (autograd's saved tensors)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    net.train()
    x, t, y = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, t, y)
    return sum(storages.values())


@pytest.mark.parametrize("name", NETS)
def test_checkpointing_gives_the_same_outputs_and_gradients(name):
    plain, checkpointed = NETS[name](False), NETS[name](True)
    out, grads = train_step(plain)
    out_ck, grads_ck = train_step(checkpointed)
    assert all(g is not None for g in grads_ck.values())
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())  # every parameter is exercised
    torch.testing.assert_close(out_ck, out, rtol=0, atol=0)
    for key in grads:
        torch.testing.assert_close(grads_ck[key], grads[key], rtol=1e-6, atol=1e-7, msg=key)


def test_dropout_masks_are_replayed_in_the_recomputation():
    """With dropout, a recomputation that drew new masks would give other gradients: the outputs of a seed that
    differs between two plain runs show dropout is live, and the checkpointed run still equals the plain one."""
    plain = small_unet("ddpm", False)
    out, _ = train_step(plain)
    plain.zero_grad()
    torch.manual_seed(6)
    x, t, y = batch()
    assert not torch.equal(plain(x, t, y), out)  # another seed: other masks, other output
    _, grads = train_step(small_unet("ddpm", False))
    _, grads_ck = train_step(small_unet("ddpm", True))
    for key in grads:
        torch.testing.assert_close(grads_ck[key], grads[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", NETS)
def test_checkpointing_keeps_fewer_activations(name):
    plain, checkpointed = saved_bytes(NETS[name](False)), saved_bytes(NETS[name](True))
    assert checkpointed < 0.6 * plain, (checkpointed, plain)


@pytest.mark.parametrize("name", NETS)
def test_checkpointing_changes_no_state_dict_key(name):
    plain, checkpointed = NETS[name](False), NETS[name](True)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    checkpointed.load_state_dict(plain.state_dict(), strict=True)  # an existing checkpoint loads as is


@pytest.mark.parametrize("name", NETS)
def test_checkpointing_only_while_training_with_gradients(name, monkeypatch):
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    net = NETS[name](True)
    x, t, y = batch()
    net.eval()
    net(x, t, y)
    net.train()
    with torch.no_grad():
        net(x, t, y)
    assert calls == []
    net(x, t, y)
    assert calls and all(k == {"use_reentrant": False} for k in calls)
    plain = NETS[name](False).train()
    calls.clear()
    plain(x, t, y)
    assert calls == []


@pytest.mark.parametrize("build", [lambda v: UNet(16, model_channels=8, channel_mult=(1, 2), checkpoint_activations=v),
                                   lambda v: dit_tiny(16, checkpoint_activations=v)], ids=["UNet", "DiT"])
def test_a_non_bool_option_is_refused_in_one_line(build):
    with pytest.raises(UserValueError, match=r"checkpoint_activations='yes': expected true or false") as err:
        build("yes")
    assert "\n" not in str(err.value)
