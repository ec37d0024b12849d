"""`diffusion-pl list`: what a recipe can name (networks, processes, samplers, ...), read from the code.

    diffusion-pl list                          the categories and how many of each
    diffusion-pl list networks                 one line each: name, the class_path a recipe writes, description
    diffusion-pl list recipes                  the packaged recipes (`diffusion-pl fit --config NAME`)
    diffusion-pl list recipes quickstart       print a recipe
    diffusion-pl list recipes quickstart --write my.yaml    copy it out for editing (an existing file is refused)
    diffusion-pl list overrides                partial configs given after a recipe (`--config RECIPE --config fast`)

Each category is the public subclasses of one base class (diffusion_pl.utils.classes.public_subclasses) once
the package that defines them is imported, plus the network presets (diffusion_pl.networks.presets.PRESETS)
and the recipe files: nothing here is a list to keep in step with the code. Only `callbacks` (and the
overview, which counts them) imports Lightning.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Callable

from diffusion_pl.cli.common import CommandError
from diffusion_pl.utils.errors import run_command

__all__ = ["Entry", "CATEGORIES", "entries", "format_entries", "main", "parser"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One line of a listing: a name, how a recipe or option names it, a note (size, --sampler name), a description."""

    name: str
    path: str = ""
    note: str = ""
    text: str = ""


def _summary(obj: object) -> str:
    """The first line of an object's own docstring (not an inherited one)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _public(base: type, *packages: str) -> list[type]:
    """Every public subclass of `base` that a recipe can name (none defined inside a function), once the modules
    of `packages` are imported."""
    from diffusion_pl.utils.classes import import_submodules, public_subclasses

    for package in packages:
        import_submodules(importlib.import_module(package))
    return [cls for cls in public_subclasses(base) if "<locals>" not in cls.__qualname__]


def _entry(cls: type, note: str = "") -> Entry:
    from diffusion_pl.utils.classes import import_path

    return Entry(cls.__name__, import_path(cls), note, _summary(cls))


def _classes(base: type, *packages: str) -> list[Entry]:
    return [_entry(cls) for cls in _public(base, *packages)]


def _parameters(preset: Callable) -> str:
    """A preset's parameter count at its defaults, built on the meta device (no memory, no initialisation cost)."""
    import torch

    with torch.device("meta"):
        net = preset()
    count = sum(p.numel() for p in net.parameters())
    return f"{count / 1e6:.1f}M params" if count >= 1e5 else f"{count:,} params"


def _networks() -> list[Entry]:
    from diffusion_pl.networks.base import ScoreNetwork
    from diffusion_pl.networks.presets import PRESETS

    presets = [Entry(fn.__name__, f"{fn.__module__}.{fn.__name__}", _parameters(fn), _summary(fn)) for fn in PRESETS]
    return _classes(ScoreNetwork, "diffusion_pl.networks") + presets


def _processes() -> list[Entry]:
    from diffusion_pl.processes.base import Process

    return _classes(Process, "diffusion_pl.processes")


def _predictions() -> list[Entry]:
    from diffusion_pl.prediction import Prediction

    return _classes(Prediction)


def _samplers() -> list[Entry]:
    from diffusion_pl.cli.sampler_spec import sampler_classes
    from diffusion_pl.sampling.base import Sampler

    names = {cls: name for name, cls in sampler_classes().items()}  # imports diffusion_pl.sampling's modules
    return [_entry(cls, f"--sampler {names[cls]}" if cls in names else "") for cls in _public(Sampler)]


def _proposals() -> list[Entry]:
    from diffusion_pl.losses import TimeProposal

    return _classes(TimeProposal)


def _weightings() -> list[Entry]:
    from diffusion_pl.losses import Weighting

    return _classes(Weighting)


def _callbacks() -> list[Entry]:
    from lightning.pytorch import Callback

    # the project's: Lightning's own (ModelCheckpoint, ...) are in lightning.pytorch.callbacks
    return [entry for entry in _classes(Callback, "diffusion_pl.training.callbacks", "diffusion_pl.evaluation")
            if not entry.path.startswith(("lightning.", "pytorch_lightning."))]


def _recipes() -> list[Entry]:
    from diffusion_pl.cli.recipes import recipe_names, recipe_title, recipes_dir

    return [Entry(name, "", "", recipe_title(recipes_dir() / f"{name}.yaml")) for name in recipe_names()]


def _overrides() -> list[Entry]:
    from diffusion_pl.cli.recipes import override_names, recipe_path, recipe_title

    return [Entry(name, "", "", recipe_title(recipe_path(name))) for name in override_names()]


# category -> (where a recipe or command uses it, its entries)
CATEGORIES: dict[str, tuple[str, Callable[[], list[Entry]]]] = {
    "recipes": ("training recipes: diffusion-pl fit --config NAME", _recipes),
    "overrides": ("partial configs given after a recipe: diffusion-pl fit --config RECIPE --config NAME", _overrides),
    "networks": ("model.net class_path: the networks and their presets (parameters at a preset's defaults)",
                 _networks),
    "processes": ("model.process class_path: forward processes alpha(t), sigma(t)", _processes),
    "predictions": ("model.prediction class_path: what the network predicts (parameterizations)", _predictions),
    "samplers": ("--sampler NAME of sample / evaluate, or a sampler class_path (SampleGrid, FIDCallback)", _samplers),
    "proposals": ("model.loss.init_args.proposal class_path: how training draws t", _proposals),
    "weightings": ("model.loss.init_args.weighting class_path: the loss weight over t", _weightings),
    "callbacks": ("trainer.callbacks class_path: the project's (Lightning's own: lightning.pytorch.callbacks)",
                  _callbacks),
}


def entries(category: str) -> list[Entry]:
    """The entries of one category, read from the code now."""
    if category not in CATEGORIES:
        raise CommandError(f"no category {category!r}: expected one of {', '.join(CATEGORIES)}")
    return CATEGORIES[category][1]()


def format_entries(found: list[Entry]) -> list[str]:
    """One aligned line per entry: name, path, note, description (columns that are empty throughout left out)."""
    columns = [[entry.name for entry in found], [entry.path for entry in found], [entry.note for entry in found]]
    widths = [max(map(len, column), default=0) for column in columns]
    lines = []
    for i, entry in enumerate(found):
        cells = [column[i].ljust(width) for column, width in zip(columns, widths) if width]
        lines.append("  " + "  ".join([*cells, entry.text]).rstrip())
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-pl list", description=__doc__.split("\n\n")[0],
                                epilog="categories: " + ", ".join(CATEGORIES))
    p.add_argument("category", nargs="?", choices=list(CATEGORIES), metavar="CATEGORY",
                   help="what to list (none: every category with its count)")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="with `recipes` or `overrides`: print this recipe or override (YAML, its comments included)")
    p.add_argument("--write", metavar="PATH", default=None,
                   help="with `recipes NAME` or `overrides NAME`: write it to PATH (a new file, or into a folder) for "
                        "editing; an existing file is refused")
    return p


def run(args: argparse.Namespace) -> None:
    if args.name is not None and args.category not in ("recipes", "overrides"):
        raise CommandError(f"list {args.category} {args.name}: a name is taken by `list recipes NAME` and "
                           f"`list overrides NAME` only: expected `diffusion-pl list {args.category}`")
    if args.write is not None and args.name is None:
        raise CommandError("--write: expected a recipe to write: diffusion-pl list recipes NAME --write PATH")
    if args.name is not None:
        from diffusion_pl.cli.recipes import recipe_path, write_recipe

        if args.write is None:
            sys.stdout.write(recipe_path(args.name).read_text(encoding="utf-8"))
            return
        out = write_recipe(args.name, args.write)
        use = f"--config {out}" if args.category == "recipes" else f"--config RECIPE --config {out}"
        print(f"wrote {out}: train with `diffusion-pl fit {use}`", file=sys.stderr)
        return
    if args.category is not None:
        usage, _ = CATEGORIES[args.category]
        print(f"{args.category}: {usage}")
        print("\n".join(format_entries(entries(args.category))))
        return
    print("usage: diffusion-pl list CATEGORY\n")
    width = max(map(len, CATEGORIES))
    for name, (usage, find) in CATEGORIES.items():
        print(f"  {name:<{width}}  {len(find()):>3}  {usage}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `diffusion-pl list`; returns a process exit code."""
    args = parser().parse_args(argv)
    return run_command("list", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
