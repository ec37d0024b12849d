"""Every public subclass of a base class: how the tests, the CLI and the listings find processes, samplers, ...

The import system is the registry (no lists to keep in step): a class is found once the module that defines
it is imported. `import_submodules` imports a package's modules first, so a new file is found by itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["public_subclasses", "import_submodules"]


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
