"""The command line: --help on every subcommand, --version, `python -m fada_batch`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from fada_batch import __version__
from fada_batch.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_every_issue_command_exists():
    for name in (
        "train",
        "submit",
        "collect",
        "validate",
        "evaluate",
        "ask",
        "bench",
        "stage-model",
        "demo",
        "make-tiny-model",
        "make-demo-data",
        "show-config",
    ):
        assert name in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fada-batch " + command)


def _walk(parser: argparse.ArgumentParser, path: str):
    """(command path, action) for every action of the parser tree."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, sub in action.choices.items():
                yield path, argparse.Namespace(option_strings=[name], help=helps.get(name), dest=name)
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_subcommand_and_option_has_help_text():
    """Walks the whole argparse tree: each subcommand is listed with a line in `fada-batch
    --help`, and each of its options and arguments says what it is in its own --help."""
    missing = [
        f"{path} {'/'.join(a.option_strings) or a.dest}"
        for path, a in _walk(build_parser(), "fada-batch")
        if not (a.help or "").strip() or a.help == argparse.SUPPRESS
    ]
    assert not missing, "no help text: " + ", ".join(missing)
    assert len(list(_walk(build_parser(), "fada-batch"))) > 60  # the walk reached every subcommand


def test_ask_help_describes_device_and_answer_length(capsys):
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--device {auto,cpu,cuda} where to run the model" in out
    assert "--max-new-tokens MAX_NEW_TOKENS answer length limit" in out


def test_version_and_python_m():
    out = subprocess.run(
        [sys.executable, "-m", "fada_batch", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"fada-batch {__version__}"
    console = subprocess.run(
        [str(Path(sys.executable).parent / "fada-batch"), "--help"], capture_output=True, text=True
    )
    assert console.returncode == 0 and "train" in console.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: fada-batch" in capsys.readouterr().out


def test_config_error_exit_status_and_message(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("train: {num_epoch: 3}\n")
    assert main(["show-config", "--job", str(job)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.num_epoch' (did you mean 'train.num_epochs'?)" in err
    assert main(["show-config", "--job", "job/demo.yaml", "-p", "epochs=2", "-p", "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'epochs' (did you mean 'train.num_epochs'?)" in err
    assert "unknown key 'train.bogus'" in err and "Valid keys:\n    train: num_epochs, " in err


def test_unknown_category_exit_status(capsys):
    assert main(["train", "--job", "job/demo.yaml", "--category", "Brain"]) == 2
    assert "Valid categories are" in capsys.readouterr().err


def test_task_index_out_of_range(capsys):
    assert main(["train", "--job", "job/demo.yaml", "--task-index", "99"]) == 2
    assert "out of range" in capsys.readouterr().err
