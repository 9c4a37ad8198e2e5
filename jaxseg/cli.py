"""Entry-point plumbing shared by every `python -m jaxseg.*` command."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

TRACEBACK_VARIABLE = "JAXSEG_TRACEBACK"
# Inside the package, so that an installed jaxseg finds its configs from any directory.
CONFIG_DIR = Path(__file__).resolve().with_name("configs")


class InputError(ValueError):
    """Bad input the user can correct (a flag, a config field, a file's content), with a
    message that names it. A plain ValueError is a bug of ours and keeps its traceback."""


class MissingInput(FileNotFoundError):
    """A file or folder the user named, or one a named folder must hold, does not exist."""


class Diverged(FloatingPointError):
    """The model's numbers stopped being finite (a learning rate too high, bad weights):
    the run stops, naming where."""


# What a command reports as one line; `processes.decided_by_main` re-raises these by name.
USER_ERRORS = (InputError, MissingInput, Diverged)
_failure_handlers: list[Callable[[str, BaseException | None], None]] = []


def on_failure(handler: Callable[[str, BaseException | None], None]) -> None:
    """`handler(message, unexpected)` runs when the command fails: after the one line of
    a user error (`unexpected` None), or with an error that is not the user's (a
    multi-process run tells its other processes; `processes.join`)."""
    _failure_handlers.append(handler)


def fail(message: str) -> NoReturn:
    """The one line a user reads when a command cannot go on; exit status 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    for handler in _failure_handlers:
        handler(message, None)
    sys.exit(1)


def message_lines(error: BaseException) -> list[str]:
    """An exception's message as lines: KeyError quotes its argument, and ml_collections
    wraps a KeyError in an AttributeError."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return [line.strip() for line in text.splitlines() if line.strip()]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none), for an `error:`
    line that also names the file: readers' messages run over several lines."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _unknown_config_field(argv: list[str], error: BaseException) -> str:
    """Names the `--config.a.b=...` override whose field the error reports missing."""
    lines = message_lines(error)
    missing = lines[0].strip("'\"") if lines else ""
    hint = "".join(f"; {line}" for line in lines if line.startswith("Did you mean"))
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=")[0]
        dotted = name.partition(".")[2]
        if missing in dotted.split("."):
            return f"--{name}: the config has no field {dotted!r}{hint}"
    return f"unknown config field: {' '.join(lines)}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with ml_collections' config errors as one line too.

    An override of a field the config lacks raises AttributeError or KeyError out of the
    parser, and a config file that cannot be loaded raises OSError at first use, each
    with a traceback; absl's own flag errors take two lines.
    """
    from absl import flags

    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        # absl prefixes a parser's error with the flag and its value; ours names them already.
        cause = error.__context__
        fail(str(cause) if isinstance(cause, InputError) else str(error))
    except (AttributeError, KeyError) as error:
        fail(_unknown_config_field(argv, error))
    except OSError as error:
        fail(f"cannot load the config file: {message_lines(error)[-1]}")
    for name in list(flags.FLAGS):
        try:
            # ml_collections stands in an object that raises OSError on any attribute
            # for a config file that failed to load.
            getattr(flags.FLAGS[name].value, "keys", None)
        except OSError as error:
            fail(f"cannot load the config file: {message_lines(error)[-1]}")
    return remaining


def packaged_configs() -> list[str]:
    """The names `--config=NAME` accepts: the config files installed with jaxseg."""
    return sorted(file.stem for file in CONFIG_DIR.glob("*.py") if not file.stem.startswith("_"))


def config_file(value: str, flag: str = "config") -> str:
    """A `--config` value as the file ml_collections loads, its `:argument` kept.

    A bare name (no slash, no `.py`) is a config shipped in the package, so a command need
    not know where pip put it; anything else is a path relative to the working directory,
    so an edited copy of a config runs as before.
    """
    file, colon, argument = value.partition(":")
    if "/" in file or os.sep in file or file.endswith(".py"):
        return value
    if file in packaged_configs():
        return f"{CONFIG_DIR / file}.py{colon}{argument}"
    if os.path.isfile(file):
        return value
    raise InputError(f"--{flag}={value}: no packaged config {file!r} (known: "
                     f"{', '.join(packaged_configs())}) and no such file")


def _define_for_the_caller() -> None:
    """The flags this module defines count as the calling command's, so that its `--help`
    lists them (absl attributes a flag to the module that defines it)."""
    from absl import flags

    flags.disclaim_key_flags()


def define_config_flag(name: str, help_string: str) -> None:
    """ml_collections' config file flag (`--NAME.FIELD=VALUE` overrides a field) whose
    value may also name a packaged config (`config_file`)."""
    from absl import flags
    from ml_collections import config_flags

    _define_for_the_caller()

    class NamedConfigParser(flags.ArgumentParser):
        def __init__(self, *, file_parser: flags.ArgumentParser) -> None:
            self.file_parser = file_parser

        def parse(self, argument: str):
            return self.file_parser.parse(config_file(argument, name))

        def flag_type(self) -> str:
            return self.file_parser.flag_type()

    # flags.FLAGS looked up here rather than ml_collections' default, bound at its import,
    # so that a test can parse into a registry of its own.
    config_flags.DEFINE_config_file(name, None, help_string, flag_values=flags.FLAGS,
                                    lock_config=True)
    flag = flags.FLAGS[name]
    flag.parser = NamedConfigParser(file_parser=flag.parser)


def define_tiling_flags(*, tile_size: int | None, reduction: int | None, overlap: float,
                        tile_size_note: str = "", reduction_note: str = "") -> None:
    """--tile_size, --reduction and --overlap with one meaning in every command that cuts
    slides into windows (prepare, predict): a window is `tile_size` pixels at model
    scale, the size the network sees, and covers `tile_size * reduction` pixels of the
    full-resolution slide; `overlap` is a fraction of the window."""
    from absl import flags

    _define_for_the_caller()
    flags.DEFINE_integer("tile_size", tile_size, "Window side in pixels at model scale; it "
                         "covers tile_size * reduction full-resolution pixels." + tile_size_note)
    flags.DEFINE_integer("reduction", reduction, "Downscale factor from the full-resolution "
                         "slide to model scale." + reduction_note)
    flags.DEFINE_float("overlap", overlap, "Overlap of neighbouring windows, a fraction of "
                       "the window in [0, 1).")


def overlap_fraction(overlap: float) -> float:
    """--overlap, checked."""
    if not 0 <= overlap < 1:
        raise InputError(f"--overlap {overlap} must be a fraction of the window in [0, 1)")
    return overlap


def _help_of(module_name: str) -> None:
    """`--help` for a command not started by `python -m` (a console script, whose
    `__main__` is pip's stub): absl shows `__main__`'s docstring and the flags of the
    module `sys.argv[0]` names, so both are taken from the command's module."""
    from absl import flags

    sys.modules["__main__"].__doc__ = sys.modules[module_name].__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run_main(main: Callable[[], None]) -> None:
    """Runs a command's `main` after absl has parsed its flags (defined beforehand);
    arguments that are not flags are refused, and a USER_ERRORS error becomes one line
    on stderr and exit status 1.

    The message names the file or field; a traceback would bury that line, so it is
    printed alone (JAXSEG_TRACEBACK=1 shows it for a bug report). Any other error is a
    bug of ours and keeps its traceback.
    """
    from absl import app, logging

    from jaxseg import paths

    if main.__module__ != "__main__":
        _help_of(main.__module__)

    def guarded(argv: list[str]) -> None:
        # Orbax and TensorFlow log every checkpoint step at INFO; keep warnings only.
        logging.set_verbosity(logging.WARNING)
        paths.setup_emulator_env()
        try:
            if len(argv) > 1:
                raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
            main()
        except USER_ERRORS as error:
            if os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
                raise
            fail(" ".join(message_lines(error)))
        except Exception as error:
            for handler in _failure_handlers:
                handler(f"{type(error).__name__}: {' '.join(message_lines(error))[:300]} "
                        "(traceback in its log)", error)
            raise

    app.run(guarded, flags_parser=parse_flags)
