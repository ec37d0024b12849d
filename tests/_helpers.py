"""Helpers shared by the contract tests (imported as `_helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations


def subclasses(cls: type) -> list[type]:
    """Every public subclass of `cls`, recursively, sorted by name: a new process / sampler / loss is tested by itself."""
    out = []
    for sub in cls.__subclasses__():
        if not sub.__name__.startswith("_"):
            out.append(sub)
        out.extend(subclasses(sub))
    return sorted(set(out), key=lambda c: c.__name__)
