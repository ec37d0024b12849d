"""The test suite: one folder per wing of the package (docs/design.md section 6), shared setup in tests/support
(imported as `tests.support.x`) and handed to test bodies by the fixtures of the conftest.py files."""
