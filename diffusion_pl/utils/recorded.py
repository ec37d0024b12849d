"""Objects that remember the call that built them, so a module built in Python saves a config like the CLI's.

`diffusion-pl fit` builds every component from a YAML config, and LightningCLI saves that config
(`class_path` + `init_args`) in each checkpoint; `sample`, `evaluate` and `export` rebuild the network,
process and parameterization from it. A DiffusionModule built in Python and fitted with a plain `Trainer`
has no such config, unless its components can say how they were built. `RecordsInit` records the
arguments of the constructor call of every instance (in `__new__`, before `__init__` runs, so a
subclass's own `super().__init__(...)` calls do not overwrite it), and `init_spec` writes the record as
the `{"class_path", "init_args"}` dict LightningCLI would have saved, components nested. (The same idea
as diffusers' `ConfigMixin.register_to_config`; jsonargparse serialises configs but not instances.)

A record can be written only when the class is importable by its path (not defined in `__main__` or in a
function) and every argument is plain data (None, bool, int, float, str, lists, tuples and dicts of
them) or itself a recorded object; `init_spec` says why not otherwise.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

__all__ = ["RecordsInit", "attributes", "component_specs", "init_spec", "NotRecordable"]

_PLAIN = (type(None), bool, int, float, str)


class NotRecordable(ValueError):
    """An object whose constructor call cannot be written as a config; the message says which part and why."""


class RecordsInit:
    """Mixin: each instance keeps the positional and keyword arguments of the call that built it."""

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        # object.__setattr__: an nn.Module's own __setattr__ needs its __init__ to have run
        object.__setattr__(obj, "_init_call", (args, kwargs))
        return obj


def attributes(obj: object) -> dict[str, Any]:
    """The instance's own attributes without the record (`vars(obj)` for reprs and equality)."""
    return {key: value for key, value in vars(obj).items() if key != "_init_call"}


def _importable(cls: type) -> str | None:
    """cls's dotted path if importing that path gives cls back, else None."""
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    path = f"{cls.__module__}.{cls.__qualname__}"
    module = importlib.import_module(cls.__module__)
    return path if getattr(module, cls.__qualname__, None) is cls else None


def _value(value: Any, where: str) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, RecordsInit):
        return init_spec(value, where)
    raise NotRecordable(f"{where} is a {type(value).__name__}, which a config cannot hold: expected plain values "
                        "(numbers, strings, lists) or project objects")


def init_spec(obj: RecordsInit, where: str = "object") -> dict[str, Any]:
    """`{"class_path": ..., "init_args": {...}}` of the call that built `obj`, defaults filled in.

    Raises NotRecordable (one line naming `where`, the argument and the reason) when it cannot be written.
    """
    cls = type(obj)
    call = getattr(obj, "_init_call", None)
    if call is None:
        raise NotRecordable(f"{where} is a {cls.__name__}, which does not record its constructor arguments")
    path = _importable(cls)
    if path is None:
        raise NotRecordable(f"{where} is a {cls.__qualname__} defined in {cls.__module__}, which cannot be imported "
                            "by name: define the class in an importable module")
    args, kwargs = call
    signature = inspect.signature(cls.__init__)
    try:
        bound = signature.bind(None, *args, **kwargs)  # None stands for self
    except TypeError as err:
        raise NotRecordable(f"{where}: the recorded arguments do not fit {cls.__qualname__}.__init__ ({err})") from err
    bound.apply_defaults()
    init_args: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise NotRecordable(f"{where}: {cls.__qualname__} was given extra positional arguments (*{name}), "
                                    "which a config cannot name")
        elif kind is inspect.Parameter.VAR_KEYWORD:
            init_args.update({k: _value(v, f"{where}.{k}") for k, v in value.items()})
        else:
            init_args[name] = _value(value, f"{where}.{name}")
    return {"class_path": path, "init_args": init_args}


def component_specs(components: dict[str, Any]) -> dict[str, Any]:
    """`init_spec` of each named component (None stays None); raises NotRecordable naming the first that cannot."""
    return {name: None if obj is None else init_spec(obj, name) for name, obj in components.items()}
