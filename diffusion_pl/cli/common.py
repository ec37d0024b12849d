"""What the project's commands share: the parser, the one-line input error, flag names in errors, the model options.

Every project command parses with `CommandParser`: flags are spelt with underscores as LightningCLI's are
(`--num_samples`, `--ckpt_path`), the older dash spellings (`--num-samples`) and renamed flags (`--ckpt`) are
accepted as hidden aliases, a prefix of a flag is not taken for the flag, and an unknown option is refused in
one line with the closest flag. `sample` and `evaluate` take the same loading / sampling options
(`add_model_options`); the library functions behind the commands name their arguments in one-line errors through a
`names` function, and the commands pass `flag`, so an error names the flag (`--guide_ckpt`, not `guidance.guide`).
Checkpoint loading, the device launch and the guide live in diffusion_pl/evaluation/loading.py.
"""

from __future__ import annotations

import argparse
import difflib
import sys

from diffusion_pl.guidance import Guidance
from diffusion_pl.utils.errors import UserValueError

__all__ = ["CommandError", "CommandParser", "close_option", "flag", "add_trust_option", "add_model_options",
           "guidance_from_args"]

# library argument -> flag, where the flag is not "--" + the argument
_FLAGS = {"samplers": "--sampler", "ema": "--no_ema", "sigma_rels": "--sigma_rel", "ckpt": "--ckpt_path",
          "batch": "--batch_size"}


def close_option(option: str, options) -> str | None:
    """The flag among `options` closest to a misspelt `option` (dashes read as underscores), None when none is close."""
    typed = option.split("=", 1)[0].lstrip("-").replace("-", "_")
    flags = {o[2:]: o for o in options if o.startswith("--")}  # compared without the dashes every flag shares
    matches = difflib.get_close_matches(typed, flags, n=1)
    return flags[matches[0]] if matches else None


class CommandParser(argparse.ArgumentParser):
    """argparse with the project's flag rules (Python 3.11's argparse has no hidden aliases and no suggestions).

    - no prefix abbreviations: `--num_sample` is not taken for `--num_samples` (`allow_abbrev=False`);
    - hidden aliases: a flag's dash spelling (`--num-samples` for `--num_samples`) and the old names in `flag_aliases`
      (`--ckpt` for `--ckpt_path`) parse as the flag, and `--help` shows only the flag;
    - an unknown option ends the command with one line naming it and the closest flag.
    """

    def __init__(self, *args, flag_aliases: dict[str, str] | None = None, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.aliases: dict[str, str] = dict(flag_aliases or {})

    def canonical(self, option: str) -> str | None:
        """The flag an option string stands for (itself, an alias, or its dash spelling); None if it is none."""
        name = option.split("=", 1)[0]
        for candidate in (name, self.aliases.get(name), "--" + name[2:].replace("-", "_") if name.startswith("--")
                          else None):
            if candidate in self._option_string_actions:
                return candidate + option[len(name):]
        return None

    def canonical_argv(self, args: list[str]) -> list[str]:
        """`args` with every alias spelt as its flag; refuses an unknown option in one line (exit status 2).
        Stops at `--` and, in a parser of subcommands, at the subcommand (its own parser reads the rest)."""
        out = list(args)
        stop_at_positional = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        for i, arg in enumerate(out):
            if arg == "--":
                break
            if not self._is_option(arg):
                if stop_at_positional:
                    break
                continue
            flag_ = self.canonical(arg)
            if flag_ is None:
                name = arg.split("=", 1)[0]
                close = close_option(name, self._option_string_actions)
                hint = f"; did you mean {close}?" if close else f": expected an option that `{self.prog} --help` lists"
                self.exit(2, f"{self.prog}: error: unrecognized option {name}{hint}\n")
            out[i] = flag_
        return out

    def _is_option(self, arg: str) -> bool:
        """Whether argparse reads `arg` as an option string (not a value, a negative number or a lone dash)."""
        if not arg or arg[0] not in self.prefix_chars or arg in ("-", "--") or " " in arg:
            return False
        return not (self._negative_number_matcher.match(arg) and not self._has_negative_number_optionals)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self.canonical_argv(args), namespace)


class CommandError(UserValueError):
    """A bad command-line input; the message is one line naming the input and what was expected."""


def flag(name: str) -> str:
    """The command-line flag of a library argument: `guide_ckpt` -> `--guide_ckpt` (`names` of the library calls)."""
    return _FLAGS.get(name, "--" + name)


def add_trust_option(p) -> None:
    """`--trust_config`, the same for every command that reads a checkpoint (diffusion_pl/utils/trust.py)."""
    p.add_argument("--trust_config", action="store_true",
                   help="allow a checkpoint whose saved config imports from packages other than diffusion_pl, torch, "
                        "lightning, timm, diffusers (a config is code: only for checkpoints you trust)")


def add_model_options(p) -> None:
    """The options `sample` and `evaluate` share for how a checkpoint is loaded and sampled (`guidance_from_args`
    turns the guidance ones into one Guidance)."""
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight w")
    p.add_argument("--clip_x0", type=float, default=None,
                   help="clamp the predicted x0 to [-v, v] at every step (DDPM samples with 1); default: no clipping")
    add_trust_option(p)
    p.add_argument("--guide_ckpt", default=None, metavar="PATH",
                   help="autoguidance (Karras et al. 2024): a weaker checkpoint of the same process, prediction and "
                        "image shape (a smaller or less trained model); --guidance w then mixes D_guide + w (D - D_guide)")
    p.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply guidance only at noise levels sigma/alpha in [LO, HI] (Kynkäänniemi et al. 2024); "
                        "default: at every level")
    p.add_argument("--guidance_channels", type=int, default=None, metavar="K",
                   help="guide only the first K channels of the model's output, the rest being the conditional "
                        "output (DiT samples with 3 of its 4 latent channels); default: all channels")


# Guidance's own messages name its fields; a command names the flags that set them
_GUIDANCE_FLAGS = {"guidance weight": "--guidance", "guidance interval": "--guidance_interval",
                   "guidance channels": "--guidance_channels", "clip_x0": "--clip_x0", "guidance guide": "--guide_ckpt"}


def guidance_from_args(args) -> Guidance:
    """The one Guidance of `--guidance`, `--guide_ckpt`, `--guidance_interval`, `--guidance_channels`, `--clip_x0`
    and `--trust_config`, refused in one line naming the flag."""
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
