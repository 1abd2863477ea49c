"""card_megatron/cli.py: an options dataclass becomes a command line (help from the field docstrings,
choices from Literal, defaults shown), checked with errors naming the flag and the value; every tool
runs through it, ``--help`` works for each, and no tool puts the repository on sys.path by hand."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from card_megatron import cli
from card_megatron.cli import at_least, option, positive
from card_megatron.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _colours() -> tuple[str, ...]:
    return ("red", "green")


@dataclass
class Example:
    """A made-up tool's options."""

    path: str = option(metavar="PATH")
    """Where to read."""
    mode: Literal["fast", "exact"] = "exact"
    """How to read it."""
    size: int = option(8, range=at_least(1), group="tuning")
    """Items per batch."""
    scale: Optional[float] = option(None, range=positive(" (a factor)"), group="tuning")
    """Multiply by this (default: none)."""
    colour: str = option("red", choices=_colours)
    """A registry's choice."""
    lean: bool = True
    """Take the slow reference path."""
    verbose: bool = False
    """Say more."""
    tag: list[str] = option(default_factory=list, metavar="TAG")
    """A tag (repeatable)."""
    files: list[str] = option(default_factory=lambda: ["a"], nargs="+")
    """Files; 100% of them are read."""


def test_help_from_docstrings_choices_from_literal_and_defaults_shown():
    parser = cli.build_parser(Example, description="made up")
    text = " ".join(parser.format_help().split())
    assert "--path PATH Where to read." in text
    assert "--mode {fast,exact} How to read it. (default: exact)" in text
    assert "--size SIZE Items per batch. (>= 1; default: 8)" in text
    assert "--scale SCALE Multiply by this (default: none). (positive)" in text
    assert "--colour {red,green}" in text and "--no-lean Take the slow reference path." in text
    assert "tuning:" in text and "100% of them" in text and "(default: a)" in text
    with pytest.raises(SystemExit):  # argparse refuses a value outside a Literal
        parser.parse_args(["--path", "p", "--mode", "slow"])
    with pytest.raises(SystemExit):  # and a missing required option
        parser.parse_args([])


def test_parsed_values_and_defaults():
    opts = cli.parse_options(Example, ["--path", "p"])
    assert opts == Example(path="p")
    assert (opts.mode, opts.size, opts.scale, opts.lean, opts.tag, opts.files) == ("exact", 8, None, True, [], ["a"])
    argv = ["--path", "p", "--mode", "fast", "--size", "3", "--scale", "0.5", "--no-lean", "--verbose"]
    opts = cli.parse_options(Example, argv + ["--tag", "x", "--tag", "y", "--files", "b", "c", "--colour", "green"])
    assert (opts.mode, opts.size, opts.scale, opts.lean, opts.verbose) == ("fast", 3, 0.5, False, True)
    assert (opts.tag, opts.files, opts.colour) == (["x", "y"], ["b", "c"], "green")
    cli.check_options(opts)


def test_a_range_or_choice_violation_names_the_flag_and_the_value():
    opts = cli.parse_options(Example, ["--path", "p", "--size", "0", "--scale", "-2"])
    with pytest.raises(ConfigError) as e:
        cli.check_options(opts)
    assert str(e.value) == "--size (0) must be >= 1; --scale (-2.0) must be positive (a factor)"
    nan = Example(path="p", scale=float("nan"), mode="slow")  # built in code: the same checks
    assert cli.option_problems(nan) == [
        "--mode ('slow') must be one of fast, exact",
        "--scale (nan) must be a finite number",
    ]


def test_run_tool_reports_a_bad_value_with_the_tools_status(capsys):
    calls = []

    def run(opts):
        calls.append(opts)
        raise FileNotFoundError("no such file: p")

    assert cli.run_tool(Example, run, ["--path", "p", "--size", "0"], error_status=2) == 2
    assert capsys.readouterr().err == "error: --size (0) must be >= 1\n" and not calls  # checked before running
    assert cli.run_tool(Example, run, ["--path", "p"], error_prefix="x.py: error: ") == 1
    assert capsys.readouterr().err == "x.py: error: no such file: p\n" and len(calls) == 1


LIBRARY_TOOLS = ("generate", "evaluate", "export_hf", "import_hf", "preprocess_data", "build_index")
MODULES = [f"card_megatron.tools.{n}" for n in LIBRARY_TOOLS] + ["apps.study", "apps.demo.report"]


@pytest.mark.parametrize("name", ["generate", "evaluate", "export_hf", "import_hf", "preprocess_data"])
def test_typed_tools_take_their_flags_from_the_options_dataclass(name):
    module = importlib.import_module(f"card_megatron.tools.{name}")
    text = module.build_parser().format_help()
    assert "--checkpoint" in text or "--input" in text
    assert "sys.path" not in open(module.__file__).read()


def test_preprocess_keeps_megatrons_flags():
    from card_megatron.tools.preprocess_data import PreprocessCommand

    argv = ["--input", "a.jsonl", "b.txt", "--output-prefix", "o", "--tokenizer-type", "HuggingFaceTokenizer"]
    opts = cli.parse_options(PreprocessCommand, argv + ["--append-eod", "--workers", "3"])
    assert (opts.input, opts.json_keys, opts.tokenizer_type, opts.workers) == (
        ["a.jsonl", "b.txt"],
        ["text"],
        "HuggingFaceTokenizer",
        3,
    )
    assert (opts.tokenizer_model_type, opts.append_eod, opts.merge) == ("unigram", True, None)
    with pytest.raises(SystemExit):
        cli.parse_options(PreprocessCommand, ["--output-prefix", "o", "--tokenizer-type", "GPT2BPETokenizer"])


def test_generate_keeps_its_flags_and_defaults():
    from card_megatron.inference.causal import COMMIT_POLICIES, CausalDecodeConfig
    from card_megatron.tools.generate import GenerateOptions, build_parser

    args = build_parser().parse_args(["--checkpoint", "c", "--no-lean", "--prompt", "a", "--prompt", "b"])
    assert (args.lean, args.prompt, args.window, args.threshold) == (False, ["a", "b"], 8, 0.9)
    assert args.commit_policy == CausalDecodeConfig().commit_policy and args.dtype == "float32"
    help_text = build_parser().format_help()
    assert "{" + ",".join(COMMIT_POLICIES) + "}" in help_text and "verify" in help_text
    with pytest.raises(ConfigError, match=r"--window \(0\) must be >= 1"):
        cli.check_options(GenerateOptions(checkpoint="c", window=0))


def test_study_options():
    from apps.study.main import StudyOptions, build_parser, plan_names

    args = build_parser().parse_args(["--out", "o", "--set", "train.train_iters=2", "--set", "a.b=1", "--list"])
    assert (args.plan, args.overrides, args.list_plan) == ("cpu", ["train.train_iters=2", "a.b=1"], True)
    assert {"smoke", "cpu", "gpu", "adapt"} <= set(plan_names())
    with pytest.raises(ConfigError, match=r"--jobs \(0\) must be >= 1"):
        cli.check_options(StudyOptions(out="o", jobs=0))


def test_no_tool_puts_the_repository_on_sys_path():
    tools = glob.glob(os.path.join(REPO, "tools", "*.py"))
    assert len(tools) >= 12
    wrong = [os.path.relpath(p, REPO) for p in tools if "sys.path.insert" in open(p).read()]
    assert not wrong, f"sys.path.insert in {wrong}: the package is installed (pip install -e .)"


def test_the_command_line_layer_does_not_import_torch():
    """cli and the preprocess tool start without torch (1.5 s per start): the CLI tests of preprocessing spawn
    it dozens of times, and a user who only tokenizes should not pay for it."""
    code = "import sys, card_megatron.cli, card_megatron.tools.preprocess_data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_startup_note_is_installed_in_one_place():
    """Only cli.start_logging calls quiet_warnings.install: every entry point goes through it."""
    callers = []
    paths = [os.path.join(REPO, "tools", "gpu_checks.sh"), os.path.join(REPO, "tools", "demo.sh")]
    for top in ("card_megatron", "apps", "tools"):
        paths += glob.glob(os.path.join(REPO, top, "**", "*.py"), recursive=True)
    for path in paths:
        if "quiet_warnings.install()" in open(path).read():
            callers.append(os.path.relpath(path, REPO))
    assert callers == [os.path.join("card_megatron", "cli.py")], callers


def _tool_scripts() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "tools", "*.py")))


@pytest.mark.slow  # one interpreter per tool (torch imported by most)
@pytest.mark.parametrize("script", _tool_scripts())
def test_every_tool_help_works(script):
    if script == "run_lm_eval.py":
        pytest.importorskip("lm_eval")
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", script), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_python_m_runs_the_same_main(module):
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


def test_positional_overrides_build_index():
    from card_megatron.tools.build_index import BuildIndexOptions

    opts = cli.parse_options(BuildIndexOptions, ["data.split=98,1,1", "--seed", "3", "train.seed=4"])
    assert (opts.overrides, opts.seed, opts.valid_samples, opts.log_level) == (
        ["data.split=98,1,1", "train.seed=4"],
        3,
        0,
        "INFO",
    )
    assert cli.parse_options(BuildIndexOptions, []).overrides == []
    with pytest.raises(ConfigError, match=r"--valid-samples \(-1\) must be >= 0"):
        cli.check_options(BuildIndexOptions(valid_samples=-1))
