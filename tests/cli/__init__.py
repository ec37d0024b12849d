"""Tests of diffusion_pl/cli and of the project as a whole: the commands, bad inputs, recipes and their sources,
packaging, layout, run folders."""
