"""Render configs/sources/*.yaml (cifar10, imagenet) as the recipe tables of docs/recipes.md, and check recipes against them.

    python configs/sources/tables.py                    # print the tables (Markdown)
    python configs/sources/tables.py --write docs/recipes.md  # replace its recipe-tables section

tests/cli/test_recipe_sources.py imports `check` and `render` from here, so the docs, the recipes and
the table cannot drift apart.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parents[1]
SOURCE_FILES = ("cifar10.yaml", "imagenet.yaml")  # in the docs' order; each maps recipe names to tables
SOURCES = Path(__file__).resolve().parent / SOURCE_FILES[0]
BEGIN, END = "<!-- recipe-tables:begin -->", "<!-- recipe-tables:end -->"
_SEGMENT = re.compile(r"^(\w+)(?:\[([^\]]+)\])?$")
MISSING = object()


def load_sources() -> dict[str, dict]:
    """Every recipe's table, from all SOURCE_FILES (a recipe name appears in one file only)."""
    out: dict[str, dict] = {}
    for name in SOURCE_FILES:
        tables = yaml.safe_load((SOURCES.parent / name).read_text()) or {}
        repeated = sorted(set(out) & set(tables))
        if repeated:
            raise ValueError(f"configs/sources/{name} repeats the tables of {', '.join(repeated)}")
        out.update(tables)
    return out


def load_recipe(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def lookup(config: Any, key: str) -> Any:
    """The value at a dotted key; `list[Name]` picks the entry whose class_path ends with Name, `list[0]` an index."""
    value = config
    for part in key.split("."):
        match = _SEGMENT.match(part)
        if match is None:
            raise ValueError(f"bad key segment {part!r} in {key!r}")
        name, index = match.groups()
        if not isinstance(value, dict) or name not in value:
            return MISSING
        value = value[name]
        if index is None:
            continue
        if not isinstance(value, list):
            return MISSING
        if index.isdigit():
            value = value[int(index)] if int(index) < len(value) else MISSING
        else:
            found = [v for v in value if isinstance(v, dict) and str(v.get("class_path", "")).endswith(index)]
            value = found[0] if len(found) == 1 else MISSING
        if value is MISSING:
            return MISSING
    return value


def _keys(row: dict) -> list[str]:
    key = row.get("key")
    return [] if key is None else ([key] if isinstance(key, str) else list(key))


def recipe_value(config: dict, row: dict) -> Any:
    """The recipe's value(s) for a row: one value, a list for a list of keys; an absent key reads as None."""
    values = [lookup(config, k) for k in _keys(row)]
    values = [None if v is MISSING else v for v in values]
    return values[0] if isinstance(row.get("key"), str) else values


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def check(name: str, table: dict, config: dict) -> list[str]:
    """Every problem of one recipe against its table, as lines (empty: the recipe is its table)."""
    problems = []
    for field in ("title", "paper", "code", "expect", "rows"):
        if field not in table:
            problems.append(f"{name}: the table has no '{field}'")
    for row in table.get("rows", []):
        label = f"{name}: {row.get('name', '?')}"
        for field in ("name", "official", "source"):
            if field not in row:
                problems.append(f"{label}: the row has no '{field}'")
        deviates = "recipe" in row
        if (deviates or not _keys(row)) and not str(row.get("why", "")).strip():
            problems.append(f"{label}: a deviation or a value outside the YAML needs a 'why'")
        if not _keys(row):
            continue
        expected = row["recipe"] if deviates else row["official"]
        actual = recipe_value(config, row)
        if isinstance(row.get("key"), str):
            missing = lookup(config, row["key"]) is MISSING and expected is not None
        else:
            missing = any(lookup(config, k) is MISSING for k in _keys(row))
        if missing:
            problems.append(f"{label}: the recipe has no {row['key']}")
        elif not _equal(actual, expected):
            problems.append(f"{label}: the recipe has {actual!r} at {row['key']}, the table says {expected!r}")
    return problems


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if value is None:
        return "none"
    return str(value).replace("|", "\\|")


def render(sources: dict[str, dict] | None = None) -> str:
    """The Markdown of all recipe tables."""
    sources = load_sources() if sources is None else sources
    out = []
    for name, table in sources.items():
        config = load_recipe(name)
        out += [f"#### `configs/{name}.yaml`: {table['title']}", "",
                f"Paper: {table['paper']}. Reference code: {table['code']}. Network: `{table.get('network', 'see rows')}`.",
                "", f"On GPUs, expect: {table['expect']}.", "",
                "| hyperparameter | official | source | recipe | deviation, and why |",
                "|---|---|---|---|---|"]
        for row in table["rows"]:
            recipe = _cell(recipe_value(config, row)) if _keys(row) else "(code)"
            note = row.get("why", "") if ("recipe" in row or not _keys(row)) else ""
            out.append(f"| {row['name']} | {_cell(row['official'])} | {row['source']} | {recipe} | {note} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def readme_section(text: str) -> str | None:
    """The text between a Markdown file's markers, or None without them."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the section between the markers of this Markdown file")
    args = parser.parse_args(argv)
    tables = render()
    if args.write is None:
        sys.stdout.write(tables)
        return 0
    text = args.write.read_text()
    if readme_section(text) is None:
        print(f"{args.write}: no '{BEGIN}' ... '{END}' section to replace", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    args.write.write_text(f"{head}{BEGIN}\n{tables}{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
