"""`python -m jaxseg.demo --workdir=DIR`: the whole job on synthetic slides, no data needed.

Runs the same commands a user runs on the competition data, printing each one first:
synthetic slides (made once) -> tiles -> K-fold training of the CPU config (one fold by
default) -> whole-slide prediction of the held-out test slides (and their polygons, mask
pyramids, statistics and TP/FP/FN overlays in outputs/) -> Dice against their truth.
Each stage is skipped when its output already exists, so an interrupted demo resumes.
"""
from __future__ import annotations

import shlex
import subprocess
import sys

from absl import flags

from jaxseg import cli, paths

CONFIG = "cpu"    # the packaged jaxseg/configs/cpu.py
MODEL_TILE = 128  # pixels per tile at model scale, as prepare's and predict's --tile_size
REDUCTION = 4     # as the recipe: tiles are seen at a quarter of full resolution


def run_stage(title: str, args: list[str], done: paths.Path) -> None:
    """Runs `python -m ...` unless `done` exists; a failing stage ends the demo with its code."""
    print(f"\n== {title}\n$ python {shlex.join(args)}", flush=True)
    if done.exists():
        print(f"(skipped: {done} exists)")
        return
    completed = subprocess.run([sys.executable, *args])
    if completed.returncode != 0:
        raise SystemExit(completed.returncode)


def define_flags() -> None:
    flags.DEFINE_string("workdir", "demo", "Directory for slides, tiles, run and results.")
    flags.DEFINE_integer("epochs", 12, "Training epochs.")
    flags.DEFINE_string("folds", "0", "Folds to train ('all' for every fold).")
    flags.DEFINE_integer("num_train", 6, "Synthetic training slides.")
    flags.DEFINE_integer("num_test", 2, "Synthetic test slides.")
    flags.DEFINE_integer("slide_size", 3000, "Synthetic slide side, full-res pixels.")


def main() -> None:
    options = flags.FLAGS
    if paths.is_remote(options.workdir):
        raise cli.InputError(f"--workdir={options.workdir}: the demo makes its synthetic slides "
                             "on a local disk; give a local directory")
    root = paths.path(options.workdir)
    slides, tiles, run = root / "slides", root / "tiles", root / "run"
    submission = root / "submission.csv"
    run_stage("synthetic slides in the competition layout", [
        "-m", "jaxseg.synthetic", f"--out_dir={slides}", f"--num_train={options.num_train}",
        f"--num_test={options.num_test}", f"--height={options.slide_size}",
        f"--width={options.slide_size}"], slides / "test_truth.csv")
    run_stage("tiles: 512 px windows reduced 4x, background dropped", [
        "-m", "jaxseg.prepare", f"--competition_dir={slides}", f"--out_dir={tiles}",
        f"--tile_size={MODEL_TILE}", f"--reduction={REDUCTION}", "--overlap=0.5"],
        tiles / "prepare.json")
    run_stage("K-fold training, Unet-efficientnetb0 (jaxseg/configs/cpu.py)", [
        "-m", "jaxseg.train", f"--config={CONFIG}", f"--workdir={run}",
        f"--config.data_dir={tiles}", f"--config.image_size={MODEL_TILE}",
        "--config.num_folds=3", f"--config.folds={options.folds}",
        f"--config.epochs={options.epochs}"], run / "summary.json")
    run_stage("whole-slide prediction of the test slides", [
        "-m", "jaxseg.predict", f"--workdir={run}", f"--images={slides / 'test' / '*.tiff'}",
        f"--out={submission}", f"--out_dir={root / 'outputs'}",
        "--outputs=geojson,mask_tiff,stats,overlay", f"--truth={slides / 'test_truth.csv'}"],
        submission)
    run_stage("Dice against the test truth", [
        "-m", "jaxseg.evaluate", f"--pred={submission}", f"--truth={slides / 'test_truth.csv'}",
        f"--images={slides / 'test' / '*.tiff'}"], root / "never-skipped")


def run() -> None:
    """Where `python -m jaxseg.demo` and the console script `jaxseg-demo` start, so
    both parse the same flags and report errors alike."""
    define_flags()
    cli.run_main(main)


if __name__ == "__main__":
    run()
