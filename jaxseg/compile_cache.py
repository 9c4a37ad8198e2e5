"""JAX's persistent compilation cache, on by default for every command that compiles.

Compiling the Unet's train step takes about a minute on a CPU and several on a GPU, and
a run compiles the same programs on every start: each resume after a preemption, each
new fold set, each prediction. With the cache, an identical program (same model, shapes,
devices, JAX version) is read back from disk instead. The cache lives in the user's
cache folder (`$XDG_CACHE_HOME/jaxseg/xla`, else `~/.cache/jaxseg/xla`), or wherever
`--compile_cache` points (a `gs://` folder shares it between the hosts of a pod slice);
`--compile_cache=off` compiles afresh. A cache folder set by JAX's own
`JAX_COMPILATION_CACHE_DIR` is kept when the flag is not given.
"""
from __future__ import annotations

import json
import os

OFF = "off"
# Beside the cached programs: how long each kind of step took to compile when it was not
# in the cache, which a run announces before compiling it again.
SECONDS_FILE = "jaxseg-compile-seconds.json"
# Programs compiled faster than this are not worth a disk entry (JAX's default too).
MIN_COMPILE_SECONDS = 1.0


def default_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jaxseg", "xla")


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("compile_cache", None, "Folder of compiled programs kept between "
                        f"runs (default: {default_dir()}, or JAX_COMPILATION_CACHE_DIR); "
                        f"'{OFF}' compiles afresh.")


def enable(directory: str | None) -> str | None:
    """Points JAX's persistent cache at `directory` (None: the default); returns the
    folder in use, None when off. Call before the first compilation and before
    `processes.join`, which turns the cache off for CPU processes (they must compile
    each program together; see there)."""
    import jax

    if directory == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = directory or jax.config.jax_compilation_cache_dir or default_dir()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_SECONDS:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory


def enable_from_flags() -> str | None:
    from absl import flags

    return enable(flags.FLAGS.compile_cache)


def _seconds_file():
    import jax

    from jaxseg import paths

    directory = jax.config.jax_compilation_cache_dir
    if not (jax.config.jax_enable_compilation_cache and directory):
        return None
    return paths.path(directory) / SECONDS_FILE


def remembered_seconds(key: str) -> float | None:
    """How long the program `key` names took to compile when it was last compiled here."""
    path = _seconds_file()
    try:
        return float(json.loads(path.read_text())[key]) if path is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # nothing remembered yet, or a file another version wrote


def remember_seconds(key: str, seconds: float) -> None:
    """Best effort: a cache folder that cannot be written only loses the announcement."""
    from jaxseg import paths

    path = _seconds_file()
    if path is None:
        return
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        known = known if isinstance(known, dict) else {}
        known[key] = round(seconds, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.atomic_write(path, json.dumps(known, indent=1, sort_keys=True) + "\n")
    except (OSError, ValueError):
        pass
