"""`--sampler`: a short name, or a class_path / init_args spec parsed as LightningCLI parses the recipes.

`resolve_sampler(text, steps)` returns the sampler and its resolved spec (class_path and every
init_arg, defaults and nested objects such as a grid included), which `sample` and `evaluate`
record. jsonargparse parses and checks the spec against the Sampler base type; every dotted import
path in it must lie in diffusion_pl or torch, so a spec given on the command line imports nothing else.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import warnings
from pathlib import Path

import yaml

from diffusion_pl.cli.common import CommandError
from diffusion_pl.utils.errors import one_line
from diffusion_pl.sampling import base, dpm_solver, edm, grids, noise, ode, posterior, sde
from diffusion_pl.sampling.base import Sampler

__all__ = ["sampler_classes", "resolve_sampler", "make_sampler", "sampler_help", "SAMPLER_STEPS_HELP"]


# the modules of diffusion_pl/sampling/ that define the samplers and their parts (grids, noise); the package's
# __init__ re-exports nothing, so each name is found in (and written with) its defining module
SAMPLING_MODULES = (posterior, sde, ode, edm, dpm_solver, grids, noise, base)


def _exported() -> list[object]:
    """Every object the sampling modules list in their __all__."""
    return [getattr(module, name) for module in SAMPLING_MODULES for name in module.__all__]


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def sampler_classes() -> dict[str, type[Sampler]]:
    """CLI name (lower-case class name) -> sampler class, for every sampler the diffusion_pl.sampling modules export."""
    return {cls.__name__.lower(): cls for cls in _exported()
            if inspect.isclass(cls) and issubclass(cls, Sampler) and cls is not Sampler}


# --- sampler specs: `--sampler NAME`, a class_path / init_args spec (JSON or YAML), or a file holding one ---

SPEC_PACKAGES = ("diffusion_pl", "torch")
SPEC_FILE_SUFFIXES = (".yaml", ".yml", ".json")
SAMPLER_HELP = (
    "a sampler class of diffusion_pl.sampling by name, case-insensitive ({names}); or a class_path / init_args "
    "spec in JSON or YAML, as the recipes write it, e.g. "
    "'{{\"class_path\": \"diffusion_pl.sampling.posterior.DDIM\", \"init_args\": {{\"steps\": 50, \"eta\": 0.5}}}}' "
    "(nested objects such as a grid take the same form), or a .yaml / .json file holding one. Class paths must lie "
    "in the packages diffusion_pl or torch: a spec given here is data and imports no other module (only a "
    "training recipe, which is code you chose to run, may)")
SAMPLER_STEPS_HELP = ("sampler steps (default: the sampler's own); with a spec, sets its init_args.steps (a spec "
                      "that sets steps itself is refused together with --steps)")
SPEC_EXPECTED = ("a mapping {class_path: <a diffusion_pl.sampling Sampler subclass>, init_args: {...}} "
                 "(JSON or YAML, or a .yaml / .json file) or a sampler name")
_DOTTED = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)+")  # a dot import path (unicode identifiers included)


def sampler_help() -> str:
    """The --sampler help text (the short names listed)."""
    return SAMPLER_HELP.format(names=", ".join(sorted(sampler_classes())))


def _shown(text: str, width: int = 60) -> str:
    """The --sampler argument as the error message quotes it: one line, at most `width` characters."""
    line = " ".join(str(text).split())
    return repr(line if len(line) <= width else line[: width - 3] + "...")


def _spec_error(text: str, problem: str, expected: str) -> CommandError:
    return CommandError(f"--sampler {_shown(text)}: {problem}; expected {expected}")


def _load_spec(text: str) -> object:
    """The spec `text` stands for: a short name's class_path, a file's content, or the text parsed as YAML."""
    classes = sampler_classes()
    name = text.strip()
    if name.lower() in classes:
        cls = classes[name.lower()]
        return {"class_path": _class_path(cls)}
    is_file = False
    if "\n" not in name and len(name) < 4096:
        try:
            is_file = Path(name).is_file()
        except (OSError, ValueError):
            pass
    if is_file or name.lower().endswith(SPEC_FILE_SUFFIXES):
        if not is_file:
            raise _spec_error(text, "the file does not exist", "a .yaml / .json file holding a class_path / "
                              "init_args spec")
        try:
            content = Path(name).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise _spec_error(text, f"the file cannot be read ({type(err).__name__})", "a readable text file") from err
        where = "the file"
    else:
        content, where = text, "the spec"
    try:
        spec = yaml.safe_load(content)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or one_line(err)
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise _spec_error(text, f"{where} is not valid JSON / YAML ({problem}{at})", SPEC_EXPECTED) from err
    if isinstance(spec, str) and _DOTTED.fullmatch(spec.strip()):
        return {"class_path": spec.strip()}  # a bare class path: its defaults
    if isinstance(spec, str) and where == "the spec":
        raise _spec_error(text, "is not a sampler name", f"one of {', '.join(sorted(classes))}, or a class_path / "
                          "init_args spec")
    return spec


def _check_imports(text: str, value: object, depth: int = 0) -> None:
    """Refuse any dot import path outside SPEC_PACKAGES anywhere in the spec, also inside strings that
    jsonargparse would parse as YAML, so that parsing the spec imports nothing else."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_imports(text, key, depth)
            _check_imports(text, item, depth)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_imports(text, item, depth)
    elif isinstance(value, str):
        for path in _DOTTED.findall(value):
            if path.split(".", 1)[0] not in SPEC_PACKAGES:
                raise _spec_error(text, f"{path} lies outside the packages {' and '.join(SPEC_PACKAGES)}",
                                  "class paths under diffusion_pl or torch (a command-line sampler spec imports "
                                  "no other module)")
        if depth < 8:
            try:
                decoded = yaml.safe_load(value)
            except yaml.YAMLError:
                return
            if decoded != value and not isinstance(decoded, (int, float, bool, type(None))):
                _check_imports(text, decoded, depth + 1)


def _jsonargparse_problem(err: BaseException) -> str:
    """jsonargparse's nested error message as one line: the init_args key path, then the innermost problem."""
    keys, problem, union_errors = [], None, []
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith('Parser key "') and line.endswith('":'):
            key = line[len('Parser key "'):-2]
            if key != "sampler":
                keys.append(key)
        elif line.startswith("Problem with given class_path"):
            continue
        elif problem is None:
            problem = line
            if line.startswith("Does not validate against any of the Union subtypes"):
                union_errors = [x[2:] for x in lines[i + 1:] if x.startswith("- ") and
                                not x.startswith("- Expected a <class 'NoneType'>")]
            break
    if union_errors:
        problem = union_errors[0]
    problem = problem or one_line(err)
    return f"init_args.{'.'.join(keys)}: {problem}" if keys else problem


def _canonical_class_paths(value: object, text: str) -> object:
    """The resolved spec with every class_path checked against SPEC_PACKAGES and written as the recipes
    write it: `diffusion_pl.sampling.posterior.DDIM` for a class diffusion_pl.sampling exports (whether the spec
    said `ddim`, `DDIM` or `diffusion_pl.sampling.posterior.DDIM`), so equal samplers have equal specs."""
    if isinstance(value, list):
        return [_canonical_class_paths(item, text) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: _canonical_class_paths(item, text) for key, item in value.items()}
    path = value.get("class_path")
    if isinstance(path, str):
        if path.split(".", 1)[0] not in SPEC_PACKAGES:
            raise _spec_error(text, f"{path} lies outside the packages {' and '.join(SPEC_PACKAGES)}",
                              "class paths under diffusion_pl or torch")
        module_name, _, name = path.rpartition(".")
        module = sys.modules.get(module_name)  # imported by jsonargparse while it resolved the spec
        cls = getattr(module, name, None) if module is not None else None
        if inspect.isclass(cls) and any(cls is exported for exported in _exported()):
            value["class_path"] = _class_path(cls)
    return value


def _json_data(value: object) -> object:
    """Plain JSON data (tuples -> lists, other objects -> str), equal to itself after a JSON round trip."""
    return json.loads(json.dumps(value, default=str))


def resolve_sampler(text: str, steps: int | None = None) -> tuple[Sampler, dict]:
    """The sampler `--sampler text [--steps steps]` asks for, and its resolved spec as JSON data.

    `text` is a short name (`ddim`, case-insensitive), a class_path / init_args spec in JSON or YAML
    (nested objects such as a grid in the same form), a bare class path, or a .yaml / .json file
    holding a spec. The spec is parsed and instantiated by jsonargparse against the Sampler base type
    (LightningCLI's checking of init_args); class paths outside diffusion_pl and torch are refused
    before anything is imported. `steps` sets init_args.steps; a spec that sets it too is refused.
    The resolved spec is {"class_path": ..., "init_args": {every argument, defaults included}}, nested
    objects likewise: what a rerun compares to decide it is the same run. Raises CommandError (one line).
    """
    from jsonargparse import ArgumentParser

    if steps is not None and (isinstance(steps, bool) or steps < 1):
        raise CommandError(f"--steps {steps} is invalid: expected a positive integer")
    spec = _load_spec(text)
    if not isinstance(spec, dict):
        raise _spec_error(text, f"is a {type(spec).__name__}, not a mapping", SPEC_EXPECTED)
    extra = sorted(map(str, set(spec) - {"class_path", "init_args"}))
    if "class_path" not in spec or extra:
        problem = f"has the keys {', '.join(extra)}" if extra else "has no class_path"
        raise _spec_error(text, problem, "only class_path and init_args at the top")
    if not isinstance(spec["class_path"], str):
        raise _spec_error(text, f"class_path is a {type(spec['class_path']).__name__}", "a class path string")
    init_args = spec.get("init_args")
    if init_args is None:
        init_args = {}
    if not isinstance(init_args, dict):
        raise _spec_error(text, f"init_args is a {type(init_args).__name__}", "a mapping of argument names to values")
    classes = sampler_classes()
    class_path = spec["class_path"].strip()
    if "." not in class_path and class_path.lower() in classes:  # `class_path: ddim` as the short name
        class_path = _class_path(classes[class_path.lower()])
    spec = {"class_path": class_path, "init_args": dict(init_args)}
    if steps is not None:
        if "steps" in spec["init_args"]:
            raise CommandError(f"--steps {steps} and --sampler {_shown(text)} both set steps: expected steps in one "
                               "place (drop --steps, or steps from init_args)")
        spec["init_args"]["steps"] = steps
    _check_imports(text, spec)
    expected = "a Sampler subclass such as diffusion_pl.sampling.posterior.DDIM with the init_args it takes"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--sampler", type=Sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = parser.parse_object({"sampler": spec})
        except Exception as err:  # jsonargparse reports every bad value as an error of the parse
            raise _spec_error(text, _jsonargparse_problem(err), expected) from err
        resolved = _json_data(cfg.sampler.as_dict() if hasattr(cfg.sampler, "as_dict") else dict(cfg.sampler))
        resolved = _canonical_class_paths(resolved, text)
        if resolved["class_path"] == _class_path(Sampler):
            raise _spec_error(text, f"{resolved['class_path']} is the abstract base class", expected)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        try:
            sampler = instantiate(cfg).sampler
        except (ValueError, TypeError) as err:  # the sampler's (or its grid's) own argument checks
            raise _spec_error(text, one_line(err), "arguments the sampler accepts") from err
    return sampler, resolved


def make_sampler(name: str, steps: int | None = None) -> Sampler:
    """The sampler `--sampler name [--steps steps]` asks for (see `resolve_sampler`, which also gives its spec)."""
    return resolve_sampler(name, steps)[0]


