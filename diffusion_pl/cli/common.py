"""What the project's commands share: the one-line input error, flag names in errors, the model options.

`sample` and `evaluate` take the same loading / sampling options (`add_model_options`); the library
functions behind the commands name their arguments in one-line errors through a `names` function, and the
commands pass `flag`, so an error names the flag the user typed (`--guide-ckpt`, not `guide_ckpt`).
Checkpoint loading, the device launch and the guide live in diffusion_pl/evaluation/loading.py.
"""

from __future__ import annotations

from diffusion_pl.guidance import Guidance
from diffusion_pl.utils.errors import UserValueError

__all__ = ["CommandError", "flag", "add_trust_option", "add_model_options", "guidance_from_args"]

# library argument -> flag, where the flag is not "--" + the argument with dashes
_FLAGS = {"samplers": "--sampler", "ema": "--no-ema", "sigma_rels": "--sigma-rel"}


class CommandError(UserValueError):
    """A bad command-line input; the message is one line naming the input and what was expected."""


def flag(name: str) -> str:
    """The command-line flag of a library argument: `guide_ckpt` -> `--guide-ckpt` (`names` of the library calls)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def add_trust_option(p) -> None:
    """`--trust-config`, the same for every command that reads a checkpoint (diffusion_pl/utils/trust.py)."""
    p.add_argument("--trust-config", action="store_true",
                   help="allow a checkpoint whose saved config imports from packages other than diffusion_pl, torch, "
                        "lightning, timm, diffusers (a config is code: only for checkpoints you trust)")


def add_model_options(p) -> None:
    """The options `sample` and `evaluate` share for how a checkpoint is loaded and sampled (`guidance_from_args`
    turns the guidance ones into one Guidance)."""
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight w")
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clamp the predicted x0 to [-v, v] at every step (DDPM samples with 1); default: no clipping")
    add_trust_option(p)
    p.add_argument("--guide-ckpt", default=None, metavar="PATH",
                   help="autoguidance (Karras et al. 2024): a weaker checkpoint of the same process, prediction and "
                        "image shape (a smaller or less trained model); --guidance w then mixes D_guide + w (D - D_guide)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply guidance only at noise levels sigma/alpha in [LO, HI] (Kynkäänniemi et al. 2024); "
                        "default: at every level")
    p.add_argument("--guidance-channels", type=int, default=None, metavar="K",
                   help="guide only the first K channels of the model's output, the rest being the conditional "
                        "output (DiT samples with 3 of its 4 latent channels); default: all channels")


# Guidance's own messages name its fields; a command names the flags that set them
_GUIDANCE_FLAGS = {"guidance weight": "--guidance", "guidance interval": "--guidance-interval",
                   "guidance channels": "--guidance-channels", "clip_x0": "--clip-x0", "guidance guide": "--guide-ckpt"}


def guidance_from_args(args) -> Guidance:
    """The one Guidance of `--guidance`, `--guide-ckpt`, `--guidance-interval`, `--guidance-channels`, `--clip-x0`
    and `--trust-config`, refused in one line naming the flag."""
    try:
        return Guidance(weight=args.guidance, guide=args.guide_ckpt, interval=args.guidance_interval,
                        channels=args.guidance_channels, clip_x0=args.clip_x0, trust_guide_config=args.trust_config)
    except ValueError as err:
        message = str(err)
        for field, name in _GUIDANCE_FLAGS.items():
            if message.startswith(field):
                message = name + message[len(field):]
                break
        raise CommandError(message) from None
