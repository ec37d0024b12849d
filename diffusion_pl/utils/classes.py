"""Every public subclass of a base class: how the tests, the CLI and the listings find processes, samplers, ...

The import system is the registry (no lists to keep in step): a class is found once the module that defines
it is imported. `import_submodules` imports a package's modules first, so a new file is found by itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["public_subclasses", "import_submodules", "import_path", "canonical_class_path"]


def import_submodules(package: ModuleType) -> None:
    """Import every module of `package` (one level), so the classes they define are known to their bases."""
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def public_subclasses(cls: type) -> list[type]:
    """Every subclass of `cls` whose name does not start with `_`, recursively, sorted by name (deduplicated)."""
    found, todo = {}, list(cls.__subclasses__())
    while todo:
        sub = todo.pop()
        todo.extend(sub.__subclasses__())
        if not sub.__name__.startswith("_"):
            found[f"{sub.__module__}.{sub.__qualname__}"] = sub
    return sorted(found.values(), key=lambda c: (c.__name__, c.__module__))


def import_path(cls: type) -> str:
    """The path a saved config names `cls` by: its public name at the package root when it has one (what
    LightningCLI writes, the shortest import path; it stays valid when modules move), else its defining module."""
    import diffusion_pl  # the package root: loaded before any of its modules, so this imports nothing new

    name = cls.__qualname__
    if cls.__module__.startswith("diffusion_pl.") and getattr(diffusion_pl, "_PUBLIC", {}).get(name) is not None \
            and getattr(diffusion_pl, name) is cls:
        return f"diffusion_pl.{name}"
    return f"{cls.__module__}.{name}"


def canonical_class_path(path: str) -> str:
    """`import_path` of the class a diffusion_pl class path names (`diffusion_pl.networks.unet.UNet` ->
    `diffusion_pl.UNet`); any other path, or one that does not resolve, as it is."""
    if not isinstance(path, str) or not path.startswith("diffusion_pl."):
        return path
    module, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path
    return import_path(obj) if isinstance(obj, type) else path
