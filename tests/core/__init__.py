"""Tests of the core: processes, prediction, guidance, sampling, losses, likelihood, oracle, networks."""
