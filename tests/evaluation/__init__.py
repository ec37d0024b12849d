"""Tests of diffusion_pl/evaluation: metrics, the evaluation callbacks, reference statistics, the evaluation API."""
