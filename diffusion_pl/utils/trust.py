"""Which classes a saved config may import: a checkpoint's or an export's config is code.

LightningCLI builds components from `class_path` strings, so loading a config from elsewhere can import
(and run) any installed module. `load_module` and `load_exported` accept import paths from
TRUSTED_PACKAGES only, unless the caller passes trust_config=True (`--trust_config`).
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

__all__ = ["TRUSTED_PACKAGES", "untrusted_imports"]

# Packages a checkpoint's saved config may import from without trust_config=True.
TRUSTED_PACKAGES = ("diffusion_pl", "torch", "lightning", "timm", "diffusers")
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def untrusted_imports(config: Any) -> list[str]:
    """Import paths in a saved config (class_path values, callables given by name) outside TRUSTED_PACKAGES."""
    found = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and _IMPORT_PATH.match(value):
            top = value.split(".", 1)[0]
            # any dotted name under class_path / _instantiator is imported; elsewhere only if it names a package
            names_import = key in ("class_path", "_instantiator") or importlib.util.find_spec(top) is not None
            if names_import and top not in TRUSTED_PACKAGES:
                found.append(value)

    walk(config)
    return found
