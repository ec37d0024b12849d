"""Subprocess entry points of the multi-process tests: run as scripts with PYTHONPATH=<repository root> (so they
import `tests.support`), never collected."""
