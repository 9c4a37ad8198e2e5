"""The persistent compilation cache: on by default in the user's cache folder, the
folder JAX was given kept, off on request; a program compiled once is read back."""
import json
import os
import subprocess
import sys

import jax
import pytest

from jaxseg import compile_cache, reporting


@pytest.fixture
def jax_cache_settings():
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
             "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_default_folder_is_the_users_cache_unless_jax_has_one(monkeypatch, tmp_path,
                                                              jax_cache_settings):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.enable(None) == str(tmp_path / "cache" / "jaxseg" / "xla")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "jaxseg" / "xla")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "given"))
    assert compile_cache.enable(None) == str(tmp_path / "given")
    assert compile_cache.enable(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert compile_cache.enable("off") is None
    assert not jax.config.jax_enable_compilation_cache


# Compiles one program with the cache in argv[1] and prints what compile_log saw.
_COMPILE_ONCE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxseg import compile_cache, reporting
compile_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
with reporting.compile_log() as seconds:
    jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 41.5).lower(np.ones((8, 8), np.float32)).compile()
print(json.dumps(seconds))
"""


def test_a_program_compiled_by_one_process_is_read_back_by_the_next(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    logs = [json.loads(subprocess.run(
        [sys.executable, "-c", _COMPILE_ONCE, str(tmp_path / "xla")], env=env, check=True,
        capture_output=True, text=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert list(logs[0]) == ["jit(<lambda>)"]
    # A program's seconds are its compilation's or its reading back's.
    assert sorted(logs[1]) == ["jit(<lambda>)", reporting.CACHE_RETRIEVALS]
    assert len(logs[1][reporting.CACHE_RETRIEVALS]) == 1
