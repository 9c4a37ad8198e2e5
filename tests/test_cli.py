"""The command-line wrapper: one error line for bad input, a traceback when asked for."""
from __future__ import annotations

import subprocess
import sys

import pytest

from jaxseg import cli


def _failing_main() -> None:
    raise cli.InputError("config.image_size: 100 is not a multiple of 32")


def _buggy_main() -> None:
    {}["backbone"]


def test_user_error_is_one_line_and_exit_status_1(monkeypatch, capsys):
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "argv", ["jaxseg.train"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(_failing_main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "error: config.image_size: 100 is not a multiple of 32\n")


def test_traceback_variable_lets_the_error_through(monkeypatch):
    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    monkeypatch.setattr(sys, "argv", ["jaxseg.train"])
    with pytest.raises(ValueError, match="not a multiple of 32"):
        cli.run_main(_failing_main)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A KeyError or ValueError of our own code is not the user's input to correct."""
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "argv", ["jaxseg.train"])
    with pytest.raises(KeyError, match="backbone"):
        cli.run_main(_buggy_main)


def test_arguments_that_are_not_flags_are_refused(monkeypatch, capsys):
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "argv", ["jaxseg.train", "stray"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(_failing_main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: unexpected arguments: stray\n"


def test_importing_the_data_pipeline_prints_nothing():
    """TensorFlow's C++ start-up notices would precede every command's output."""
    result = subprocess.run([sys.executable, "-c", "import jaxseg.data"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
