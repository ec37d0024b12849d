"""One flag style: underscore flags, the old spellings as hidden aliases, no prefix abbreviations, a suggestion for a
misspelt option (the project's argparse commands and LightningCLI's fit), and the generated CLI reference page."""

from __future__ import annotations

import argparse
import re

import pytest

from diffusion_pl.cli import reference
from diffusion_pl.cli.main import main
from tests.support.paths import REPO

# the required arguments of each command, so that one more option can be parsed
BASE = {
    "sample": ["--ckpt_path", "c.ckpt", "--num_samples", "1", "--out", "o"],
    "evaluate": ["--ckpt_path", "c.ckpt"],
    "export": ["--ckpt_path", "c.ckpt", "--out", "o"],
    "import": ["model", "--out", "o.ckpt"],
    "reconstruct-ema": ["--run", "r", "--sigma_rel", "0.1", "--out", "o"],
    "prepare": ["folder", "images", "--out", "o"],
}
ROWS = [(old, flag, command) for old, flag, commands in reference.renamed_flags() for command in commands]


def _value(action: argparse.Action) -> list[str]:
    """Command-line values for `action` that differ from what BASE gives it."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[-1])]
    one = {int: "7", float: "0.25"}.get(action.type, "xyz")
    return [one] * (action.nargs if isinstance(action.nargs, int) else 1)


def _parser(command: str) -> argparse.ArgumentParser:
    return reference.command_parsers()[command]


def test_every_renamed_command_is_covered():
    """The table has a row for each rename this change made (so that the test below runs on each)."""
    pairs = {(old, flag) for old, flag, _ in ROWS}
    assert {("--num-samples", "--num_samples"), ("--ckpt", "--ckpt_path"), ("--batch", "--batch_size"),
            ("--device", "--accelerator"), ("--clip-x0", "--clip_x0"), ("--trust-config", "--trust_config")} <= pairs
    assert {command for _, _, command in ROWS} == set(BASE)


@pytest.mark.parametrize("old,flag,command", ROWS, ids=[f"{c}:{o}" for o, _, c in ROWS])
def test_old_spelling_parses_as_the_flag(old, flag, command):
    parser = _parser(command)
    action = (parser if command != "prepare" else _parser("prepare folder"))._option_string_actions[flag]
    values = _value(action)
    with_flag = vars(parser.parse_args([*BASE[command], flag, *values]))
    with_old = vars(parser.parse_args([*BASE[command], old, *values]))
    assert with_old == with_flag
    assert with_flag[action.dest] != action.default  # the option was set, not left at its default
    if values and action.nargs is None:  # --old=value too
        assert vars(parser.parse_args([*BASE[command], f"{old}={values[0]}"])) == with_flag


@pytest.mark.parametrize("command", [c for c in reference.command_parsers() if c != "prepare"])
def test_help_shows_only_the_underscore_flags(command):
    text = _parser(command).format_help()
    dashed = re.findall(r"--[a-z0-9]+-[a-z0-9-]+", text)
    assert not dashed, f"{command} --help shows dash flags {dashed}"
    assert not re.search(r"--(ckpt|batch|device)\b(?![_s])", text)


@pytest.mark.parametrize("argv,typed,suggested", [
    (["sample", "--num_sample", "4", "--ckpt_path", "c", "--out", "o"], "--num_sample", "--num_samples"),
    (["sample", "--num-sample", "4"], "--num-sample", "--num_samples"),  # a misspelt old spelling
    (["evaluate", "--ckpt_path", "c", "--ref_stat", "ref.npz"], "--ref_stat", "--ref_stats"),
    (["prepare", "folder", "images", "--out", "o", "--max_sample", "3"], "--max_sample", "--max_samples"),
    (["reconstruct-ema", "--run", "r", "--sigma_rels", "0.1"], "--sigma_rels", "--sigma_rel"),
    (["export", "--ckpt_pth", "c"], "--ckpt_pth", "--ckpt_path"),
])
def test_misspelt_option_is_one_line_with_a_suggestion(capsys, argv, typed, suggested):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    prog = "diffusion-pl " + " ".join(argv[:2] if argv[0] == "prepare" else argv[:1])
    assert capsys.readouterr().err == f"{prog}: error: unrecognized option {typed}; did you mean {suggested}?\n"


def test_prefix_of_a_flag_is_not_taken_for_it(capsys):
    """argparse would read `--num 4` as `--num_samples 4` and `--bpd_sample 3` as `--bpd_samples 3`."""
    for argv in (["sample", "--ckpt_path", "c", "--out", "o", "--num", "4"],
                 ["evaluate", "--ckpt_path", "c", "--kid", "--bpd_sample", "3"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "unrecognized option --" in err and err.count("\n") == 1, err


def test_unknown_option_without_a_close_flag_says_where_the_flags_are(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", "c", "--out", "o", "--zebra"])
    assert capsys.readouterr().err == ("diffusion-pl export: error: unrecognized option --zebra: expected an option "
                                       "that `diffusion-pl export --help` lists\n")


def test_sweep_refuses_evaluate_options_it_sets_by_any_spelling():
    from diffusion_pl.cli.common import CommandError
    from diffusion_pl.cli.reconstruct_ema import sweep_options

    for arg in ("--ckpt", "--ckpt_path", "--ckpt-path=x"):
        with pytest.raises(CommandError, match="--ckpt_path after `--` is set by reconstruct-ema"):
            sweep_options("shards", [arg, "x"] if "=" not in arg else [arg])


def test_fit_refuses_a_prefix_of_an_option_in_one_line(capsys):
    """`fit --trainer.max_step 30` trained 30 steps (an abbreviation of --trainer.max_steps); now refused."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.max_step", "30"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("diffusion-pl fit: error: unrecognized option --trainer.max_step; did you mean "
                                       "--trainer.max_steps?\n")


def test_fit_error_is_short(capsys):
    """A bad value prints jsonargparse's message and a tip, not the 70 lines of usage."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.max_steps", "many"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('diffusion-pl fit: error: Parser key "trainer.max_steps"')
    assert err.endswith("tip: `diffusion-pl fit --help` lists the options\n")
    assert "usage:" not in err and err.count("\n") <= 4, err


def test_cli_reference_page_is_up_to_date():
    page = REPO / "docs" / "reference" / "cli.md"
    written = re.search(r"with Python (\d+\.\d+)", page.read_text())
    if written and written.group(1) != reference.PYTHON:
        pytest.skip(f"docs/reference/cli.md was generated with Python {written.group(1)}, whose argparse lays out "
                    f"help as this Python {reference.PYTHON} does not")
    assert page.read_text() == reference.page(), \
        "docs/reference/cli.md is stale: python -m diffusion_pl.cli.reference docs/reference/cli.md"
    assert "reference/cli.md" in (REPO / "mkdocs.yml").read_text()
