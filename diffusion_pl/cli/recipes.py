"""The recipes that ship with the package, addressable by name: `diffusion-pl fit --config quickstart`.

The recipe YAMLs are the repository's top-level configs/*.yaml; a wheel installs them as the package data of
`diffusion_pl.recipes` (setup.py maps that package to configs/), so they are found next to the installed
package, and in a source checkout (or an editable install) in configs/ beside it.

`--config VALUE` (fit and validate) reads VALUE as a file when one exists at that path; a bare name (letters,
digits, `_`, `-`: no folder, no suffix) that is not a file names a packaged recipe. A recipe's title is the
text of its first comment line up to the first ": " (`# DDPM on CIFAR-10: Ho, Jain & Abbeel ...`).

Overrides are partial configs given after a recipe, which change one aspect of any recipe: configs/overrides/*.yaml
(`fit --config cifar10_edm --config fast`, `--config fsdp`). They are addressed by name like recipes and listed
apart from them (`diffusion-pl list overrides`); a name is a recipe's or an override's, never both.
"""

from __future__ import annotations

import re
from pathlib import Path

from diffusion_pl.utils.errors import MissingFileError, UserValueError

__all__ = ["recipes_dir", "recipe_names", "override_names", "recipe_path", "recipe_title", "config_file",
           "write_recipe"]

SUFFIX = ".yaml"
OVERRIDES = "overrides"  # the subfolder of the overrides
_NAME = re.compile(r"[\w-]+")  # a bare recipe name: no folder, no suffix


def recipes_dir() -> Path:
    """The folder of the packaged recipes: diffusion_pl/recipes in an installed wheel, else the checkout's configs/."""
    import diffusion_pl  # the package root imports nothing heavy

    package = Path(diffusion_pl.__file__).resolve().parent
    for folder in (package / "recipes", package.parent / "configs"):
        if folder.is_dir():
            return folder
    raise MissingFileError(f"no recipes found: expected {package / 'recipes'} (an installed wheel) or "
                           f"{package.parent / 'configs'} (a source checkout)")


def recipe_names() -> list[str]:
    """The names of the packaged recipes, sorted."""
    return sorted(path.stem for path in recipes_dir().glob(f"*{SUFFIX}"))


def override_names() -> list[str]:
    """The names of the packaged overrides (partial configs given after a recipe), sorted."""
    return sorted(path.stem for path in (recipes_dir() / OVERRIDES).glob(f"*{SUFFIX}"))


def _packaged(name: str) -> Path | None:
    """The file of the packaged recipe or override `name`, None when there is neither."""
    if not _NAME.fullmatch(name):
        return None
    for path in (recipes_dir() / f"{name}{SUFFIX}", recipes_dir() / OVERRIDES / f"{name}{SUFFIX}"):
        if path.is_file():
            return path
    return None


def _known() -> str:
    return (f"a recipe ({', '.join(recipe_names())}) or an override ({', '.join(override_names())}); "
            "`diffusion-pl list recipes`, `diffusion-pl list overrides`")


def recipe_path(name: str) -> Path:
    """The file of the packaged recipe or override `name`; one line naming them when there is none."""
    path = _packaged(name)
    if path is None:
        raise UserValueError(f"no recipe {name!r}: expected {_known()}")
    return path


def recipe_title(path: Path) -> str:
    """A recipe's one-line description: its first comment line up to the first ": " (the whole line without one)."""
    with open(path, encoding="utf-8") as f:
        first = next((line.strip() for line in f if line.strip()), "")
    if not first.startswith("#"):
        return ""
    text = first.lstrip("#").strip()
    return text.split(": ", 1)[0]


def config_file(value: object) -> object:
    """The file a `--config` value stands for: the value itself when it is a file or not a bare name (a path,
    or YAML text), else the packaged recipe of that name. A missing *.yaml file whose name is a recipe's is
    refused in one line that names the recipe (`--config configs/quickstart.yaml` outside a clone)."""
    if not isinstance(value, str) or Path(value).exists():
        return value
    if _NAME.fullmatch(value):
        path = _packaged(value)
        if path is None:
            raise UserValueError(f"--config {value}: no such file and no recipe of that name: expected a YAML file "
                                 f"or {_known()}")
        return str(path)
    stem = Path(value).stem
    if Path(value).suffix in (".yaml", ".yml") and _packaged(stem) is not None:
        raise MissingFileError(f"--config {value}: no such file: expected an existing file, or the packaged "
                               f"recipe by name: --config {stem}")
    return value


def write_recipe(name: str, out: str | Path) -> Path:
    """Copy the packaged recipe `name` to `out` (a new file: an existing one is refused) and return its path."""
    source, out = recipe_path(name), Path(out)
    if out.is_dir():
        out = out / source.name
    if not out.parent.is_dir():
        raise MissingFileError(f"--write {out}: its folder {out.parent} does not exist: expected a path in an "
                               "existing folder")
    try:
        with open(out, "x", encoding="utf-8") as f:  # "x": never replaces a file, even one created meanwhile
            f.write(source.read_text(encoding="utf-8"))
    except FileExistsError:
        raise UserValueError(f"--write {out}: the file exists: expected a new path (it is not overwritten)") from None
    return out
