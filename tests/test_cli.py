"""The command line: --help on every subcommand, --version, `python -m fada_batch`."""

from __future__ import annotations

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
    assert "unknown key 'train.num_epoch'" in err and "Valid keys are" in err


def test_unknown_category_exit_status(capsys):
    assert main(["train", "--job", "job/demo.yaml", "--category", "Brain"]) == 2
    assert "Valid categories are" in capsys.readouterr().err


def test_task_index_out_of_range(capsys):
    assert main(["train", "--job", "job/demo.yaml", "--task-index", "99"]) == 2
    assert "out of range" in capsys.readouterr().err
