"""`pip install .` gives commands that work from any directory: the wheel, installed into a
throwaway venv outside the checkout, has its configs and its console scripts.

The venv sees the running interpreter's packages (JAX and the rest are not installed
again, which keeps this test to seconds); jaxseg itself must come from the wheel, not from
the checkout or an editable install there.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPTS = ("jaxseg-prepare", "jaxseg-train", "jaxseg-predict", "jaxseg-evaluate",
                   "jaxseg-demo")
# Where `--config=cpu` leads. Loading the config would import TensorFlow (its defaults
# import jaxseg.augment), over 10 s of CPU; test_cli.py loads configs by name and by file.
RESOLVE_CONFIG_NAME = """
import jaxseg
from jaxseg import cli
print(jaxseg.__file__, cli.config_file("cpu"), ",".join(cli.packaged_configs()))
"""


def _run(*command: str | Path, status: int = 0, **options) -> str:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                            timeout=120, **options)
    assert result.returncode == status, result.stdout + result.stderr
    return result.stdout


def test_the_wheel_installs_working_commands(tmp_path):
    # A copy to build from: the build writes build/ and *.egg-info beside setup.cfg, and a
    # stale build/ would put files into the wheel that the checkout no longer has.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "demo", ".whl"))
    # Neither the checkout (PYTHONPATH) nor the working directory may supply jaxseg.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", tmp_path / "wheels", source, env=env, cwd=tmp_path)
    [wheel] = (tmp_path / "wheels").glob("jaxseg-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    # Run from a venv, --system-site-packages reaches the base interpreter's packages
    # rather than the running one's: name those too (after the new venv's own).
    [site_packages] = venv.glob("lib/python*/site-packages")
    (site_packages / "running_interpreter.pth").write_text("\n".join(site.getsitepackages()))
    python = venv / "bin" / "python"
    # The system's pip, run by the venv's Python, installs into the venv; --ignore-installed
    # leaves an editable jaxseg in the system site-packages alone (and unused: the venv's
    # site-packages come first on sys.path).
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--ignore-installed", wheel, env=env, cwd="/")

    jaxseg_file, config, names = _run(python, "-c", RESOLVE_CONFIG_NAME, env=env,
                                      cwd="/").split()
    assert Path(jaxseg_file).is_relative_to(venv), jaxseg_file
    assert Path(config) == Path(jaxseg_file).parent / "configs" / "cpu.py"
    assert Path(config).is_file() and names == "b5,cpu,default"
    for script in CONSOLE_SCRIPTS:
        # The function `python -m jaxseg.X` runs.
        module = script.removeprefix("jaxseg-")
        assert f"from jaxseg.{module} import run" in (venv / "bin" / script).read_text()
    # absl's --help exits with status 1.
    help_text = _run(venv / "bin" / "jaxseg-demo", "--help", status=1, env=env, cwd="/")
    assert "the whole job on synthetic slides" in help_text and "--workdir" in help_text
