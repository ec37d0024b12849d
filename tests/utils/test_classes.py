"""utils/classes.py: the public subclasses of a base (what the CLI and the tests list) and class-path forms."""

from __future__ import annotations

import diffusion_pl
from diffusion_pl.networks.unet import UNet
from diffusion_pl.networks.unet_presets import unet_tiny
from diffusion_pl.processes.base import Process
from diffusion_pl.sampling.base import Sampler
from diffusion_pl.utils.classes import canonical_class_path, import_path, import_submodules, public_subclasses


class Base:  # a base of its own: a test subclass of Process would join every test parametrized over processes
    pass


class _Hidden(Base):  # a private subclass is not listed
    pass


class Listed(_Hidden):  # ... but its public subclass is
    pass


class Another(Base):
    pass


class Fresh:  # the base of the class a fresh package defines (kept apart from Base's listing)
    pass


def test_public_subclasses_are_recursive_sorted_and_skip_private_ones():
    assert public_subclasses(Base) == [Another, Listed]
    from diffusion_pl import processes

    import_submodules(processes)  # the process classes are known once their modules are imported
    names = [c.__name__ for c in public_subclasses(Process)]
    assert names == sorted(names) and {"VPLinear", "DDPMDiscrete", "EDM", "RectifiedFlow"} <= set(names)


def test_import_submodules_imports_a_module_nothing_imported_yet(tmp_path, monkeypatch):
    """The sampler modules below are imported by the tests already, so they cannot show that import_submodules
    imports anything: a fresh package whose module defines a subclass can."""
    import importlib
    import sys

    (tmp_path / "fresh_pkg").mkdir()
    (tmp_path / "fresh_pkg" / "__init__.py").write_text("")
    (tmp_path / "fresh_pkg" / "late.py").write_text(f"from {__name__} import Fresh\n\n\nclass Late(Fresh):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        package = importlib.import_module("fresh_pkg")
        assert "Late" not in [c.__name__ for c in public_subclasses(Fresh)]
        import_submodules(package)
        assert [c.__name__ for c in public_subclasses(Fresh)] == ["Late"]
    finally:
        for name in ("fresh_pkg.late", "fresh_pkg"):
            sys.modules.pop(name, None)


def test_import_submodules_finds_every_sampler_module():
    from diffusion_pl import sampling

    import_submodules(sampling)
    names = {c.__name__ for c in public_subclasses(Sampler)}
    assert {"DDPM", "DDIM", "HeunODE", "AdaptiveODE", "EDMStochastic", "DPMSolverPP", "EulerMaruyama"} <= names


def test_class_paths_name_the_package_root_where_the_class_is_public():
    assert import_path(UNet) == "diffusion_pl.UNet" and diffusion_pl.UNet is UNet
    assert import_path(Listed) == f"{__name__}.Listed"  # not public: its own module
    assert canonical_class_path("diffusion_pl.networks.unet.UNet") == "diffusion_pl.UNet"
    assert canonical_class_path("diffusion_pl.UNet") == "diffusion_pl.UNet"
    # a function, a foreign class and a path that does not resolve stay as they are
    assert canonical_class_path(f"{unet_tiny.__module__}.unet_tiny") == "diffusion_pl.networks.unet_presets.unet_tiny"
    assert canonical_class_path("torch.optim.Adam") == "torch.optim.Adam"
    assert canonical_class_path("diffusion_pl.networks.unet.NoSuchNet") == "diffusion_pl.networks.unet.NoSuchNet"
