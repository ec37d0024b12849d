"""Shared test setup, imported as `tests.support.x`: tiny recipes, modules, autoencoders, stand-in feature
extractors, reference models. Test bodies get it through the fixtures of tests/conftest.py (and the per-folder
conftest.py files); module-level needs (parametrize lists, constants, base classes) import it from here."""
