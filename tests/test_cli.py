"""The command-line wrapper: one error line for bad input, a traceback when asked for."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxseg import cli

REPO = Path(__file__).resolve().parent.parent


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


def _parsed_config(monkeypatch, *args: str):
    """The config a command's `--config` flags give, parsed into a flag registry of the
    test's own (ml_collections reads the overrides from sys.argv)."""
    from absl import flags

    monkeypatch.setattr(flags, "FLAGS", flags.FlagValues())
    monkeypatch.setattr(sys, "argv", ["jaxseg.train", *args])
    cli.define_config_flag("config", "The config.")
    cli.parse_flags(sys.argv)
    return flags.FLAGS.config


def test_a_config_name_and_its_file_give_the_same_config(monkeypatch):
    from jaxseg.configs import b5

    monkeypatch.chdir(REPO)
    by_name = _parsed_config(monkeypatch, "--config=b5", "--config.epochs=3")
    by_file = _parsed_config(monkeypatch, "--config=jaxseg/configs/b5.py", "--config.epochs=3")
    expected = b5.get_config()
    expected.epochs = 3
    assert by_name.to_dict() == by_file.to_dict() == expected.to_dict()


def test_a_config_file_keeps_its_argument_and_overrides(monkeypatch, tmp_path):
    (tmp_path / "sized.py").write_text(
        "import ml_collections\n\n"
        "def get_config(size):\n"
        "    return ml_collections.ConfigDict({'size': int(size), 'epochs': 1})\n")
    monkeypatch.chdir(tmp_path)
    config = _parsed_config(monkeypatch, "--config=sized.py:7", "--config.epochs=3")
    assert config.to_dict() == {"size": 7, "epochs": 3}


def test_an_unknown_config_name_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _parsed_config(monkeypatch, "--config=b7")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("error: --config=b7: no packaged config 'b7' (known: b5, "
                                       "cpu, default) and no such file\n")
