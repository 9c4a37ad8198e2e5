"""Every command's --help example, run as written in an empty folder: it must get past
its flags and stop only at the data it names (which does not exist there), so a user
who fills in their own paths has a complete command. Examples that name no input
(they only create) are parsed by the command's own flags instead."""
import importlib
import re
import shlex
import subprocess
import sys

import pytest

COMMANDS = ("prepare", "train", "predict", "evaluate", "convert", "synthetic", "demo")
# Examples whose every path is an output: running them would do the whole job.
CREATE_ONLY = ("synthetic", "demo")
_EXAMPLE = re.compile(r"python -m jaxseg\.(\w+)((?: +--[^\s`]+)+)")


def _examples() -> list[tuple[str, list[str]]]:
    found = []
    for command in COMMANDS:
        doc = importlib.import_module(f"jaxseg.{command}").__doc__
        examples = [(name, shlex.split(arguments)) for name, arguments in _EXAMPLE.findall(doc)]
        assert examples and all(name == command for name, _ in examples), command
        found += examples
    return found


def _run(command: str, arguments: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jaxseg.{command}", *arguments], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command,arguments", _examples(),
                         ids=lambda value: value if isinstance(value, str) else None)
def test_help_example_stops_only_at_the_data_it_names(command, arguments, tmp_path):
    if command in CREATE_ONLY:
        parse = (f"from absl import flags; from jaxseg import {command}; "
                 f"{command}.define_flags(); flags.FLAGS({['x', *arguments]!r}); "
                 "print(flags.FLAGS.flags_into_string())")
        result = subprocess.run([sys.executable, "-c", parse], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert all(argument in result.stdout.splitlines() for argument in arguments)
        return
    result = _run(command, arguments, tmp_path)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last_line.startswith("error: "), result.stderr[-2000:]
    values = [argument.split("=", 1)[1] for argument in arguments if "=" in argument]
    named = [value for value in values if value in last_line]
    assert named and "--config" not in last_line and "required" not in last_line, last_line
    assert not any(tmp_path.iterdir()), "an example that failed wrote files"
