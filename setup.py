"""The package list, with the recipes: configs/*.yaml install as the package data of `diffusion_pl.recipes`.

Everything else is in pyproject.toml. The packages are listed here because pyproject.toml's
`[tool.setuptools.packages.find]` finds only folders under diffusion_pl/, and an explicit `packages` list
there would have to name every subpackage by hand; `diffusion_pl.recipes` maps to the top-level configs/
folder, with the overrides of configs/overrides/ (configs/sources/, the recipes' source tables, is no package and
stays out of the wheel).
diffusion_pl/cli/recipes.py finds the recipes in an installed wheel and in a checkout.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["diffusion_pl", "diffusion_pl.*"]), "diffusion_pl.recipes"],
    package_dir={"diffusion_pl.recipes": "configs"},
    package_data={"diffusion_pl.recipes": ["*.yaml", "overrides/*.yaml"]},
)
