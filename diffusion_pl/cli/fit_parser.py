"""The argument parser of `diffusion-pl fit` / `validate`: LightningCLI's, without prefix abbreviations, with short
errors, and a `--config` that also takes the name of a recipe that ships with the package."""

from __future__ import annotations

from typing import Any

from jsonargparse import ActionConfigFile
from jsonargparse._common import debug_mode_active  # JSONARGPARSE_DEBUG: jsonargparse raises instead of printing
from lightning.pytorch.cli import LightningArgumentParser

from diffusion_pl.cli.common import close_option
from diffusion_pl.cli.recipes import config_file

__all__ = ["CONFIG_HELP", "DiffusionArgumentParser", "RecipeConfigFile"]


class DiffusionArgumentParser(LightningArgumentParser):
    """LightningCLI's parser without prefix abbreviations and with short errors.

    argparse takes an unambiguous prefix for an option (`--trainer.max_step 30` set max_steps); here a prefix is an
    unknown option. An error prints `diffusion-pl fit: error: <message>` and a tip, without jsonargparse's usage
    (some 70 lines); an unknown option is named with the closest option of the command (jsonargparse suggests none).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)  # raises
        self._logger.error(message)
        parser = getattr(ex, "subcommand_parser", None) or self
        words = parser.prog.replace(" [options]", "").split()
        command = "diffusion-pl" + (f" {words[-1]}" if len(words) > 1 else "")
        if message.lower().startswith("unrecognized arguments: "):  # jsonargparse < 4.40 capitalises it
            unknown = [a for a in message.split(": ", 1)[1].split() if a.startswith("-")]
            if unknown:
                name = unknown[0].split("=", 1)[0]
                close = close_option(name, parser._option_string_actions)
                hint = f"; did you mean {close}?" if close else f": expected an option that `{command} --help` lists"
                self.exit(2, f"{command}: error: unrecognized option {name}{hint}\n")
        self.exit(2, f"{command}: error: {message.rstrip()}\ntip: `{command} --help` lists the options\n")
CONFIG_HELP = ("a configuration file (YAML or JSON), or the name of a recipe that ships with the package, e.g. "
               "`--config quickstart` (`diffusion-pl list recipes`); a file of that name, when there is one, comes first")


class RecipeConfigFile(ActionConfigFile):
    """`--config`: a file, as LightningCLI reads it, or a packaged recipe by name (diffusion_pl.cli.recipes)."""

    def __call__(self, parser, cfg, values, option_string=None):
        super().__call__(parser, cfg, config_file(values), option_string)
