"""Train several recipes of one training config side by side, then choose one on the validation split.

    python -m benchmarks.train_sweep run benchmarks/sweeps/water_small.yaml --runs-dir runs/sweep
    python -m benchmarks.train_sweep run SWEEP.yaml --runs-dir runs/sweep --only q1 q2
    python -m benchmarks.train_sweep run SWEEP.yaml --runs-dir runs/sweep --resume
    python -m benchmarks.train_sweep summarize SWEEP.yaml --runs-dir runs/sweep --out benchmarks/results/X.json

On a GPU one training step of the small water model is launch-bound, so recipes trained at the same
time on one GPU cost little more than one. For a long sweep, detach the driver from the terminal:
``nohup python -m benchmarks.train_sweep run ... > runs/sweep.log 2>&1 &``.

Sweep file (YAML; example: benchmarks/sweeps/water_small.yaml):

    base: examples/train_water_small.yaml     # the training config (paths relative to the working directory)
    common: [batch_size=32, max_minutes=19]   # overrides of every recipe
    recipes:                                  # name -> its own overrides, applied after common
      q1: [epochs=390, direct_force_epochs=200]
      q4: [batch_size=16, epochs=210]         # a later value wins: batch_size 16 here

The sweep sets run_dir (RUNS_DIR/NAME) itself, and a recipe may not change data.*: the recipes are
compared on one validation split.

run: one ``python -m e2former_calc.train BASE --override COMMON... --override RECIPE...
--override run_dir=RUNS_DIR/NAME`` process per recipe, all at once (output to RUNS_DIR/NAME.log,
progress bars off, OMP_NUM_THREADS=--threads), waits for all of them and writes the summary. A recipe
that fails is recorded with its return code and the last lines of its log; the others go on. Without
--resume, no recipe's run_dir may exist yet. With --resume, a recipe whose run_dir holds
test_metrics.json is skipped, one with checkpoint_latest.pt continues with the train CLI's --resume,
any other starts afresh.

summarize: the summary alone, from the run directories (also the last step of run).

Selection: the chosen recipe has the lowest

    selection_score = val force MAE (meV/Å) / 40 + val energy MAE (meV/atom) / 1

of the best epoch's EMA model (test_metrics.json "val"). Test metrics are never used for the choice:
the printed table shows them only after it, marked as such.

Summary (--out, default RUNS_DIR/summary.json; the format of benchmarks/results/water_training_h200.json):

    what, date, commit, command, python, torch, device    (benchmarks.common.environment)
    data       data paths, split seed, group_by, stratify_by and split sizes (frames) from a run's config.yaml
               and split.json
    sweep, base, common, recipes (name -> its own overrides), train_command, selection
    chosen     name of the chosen recipe (null if none finished)
    runs       name -> epochs_done, train_minutes (sum of the epoch times in metrics.jsonl), and either
               best_epoch, force_mode, val, test {overall, per_cluster_size, per_source} (test_metrics.json) and
               selection_score, or failed (the reason) and log_tail (the last lines of RUNS_DIR/NAME.log)

Exit status: 0 when every recipe finished, 1 otherwise (the summary is written either way).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks.common import environment

FORCE_MAE_PER_POINT_MEV_PER_A = 40.0  # selection_score: val F MAE / 40 meV/Å + val E MAE / 1 meV/atom
ENERGY_MAE_PER_POINT_MEV_PER_ATOM = 1.0
SELECTION = (f"lowest selection_score = val force MAE (meV/Å) / {FORCE_MAE_PER_POINT_MEV_PER_A:g} + val energy MAE "
             f"(meV/atom) / {ENERGY_MAE_PER_POINT_MEV_PER_ATOM:g}, of the best epoch's EMA model; test metrics not used")
LOG_TAIL_LINES = 15
POLL_S = 1.0  # how often the driver looks for finished training processes
RECIPE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a recipe name is a directory name


# ------------------------------------------------------------------------------ the sweep file
@dataclass
class Sweep:
    """A sweep file: the training config `base`, overrides `common` to all recipes, and each recipe's own."""

    path: Path
    base: str
    common: list[str]
    recipes: dict[str, list[str]]

    def overrides(self, name: str) -> list[str]:
        """The "key=value" overrides of recipe `name`, in the order they apply (common first)."""
        return [*self.common, *self.recipes[name]]


def load_sweep(path: str | Path) -> Sweep:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"base", "common", "recipes"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (expected base, common, recipes)")
    if not raw.get("base") or not raw.get("recipes"):
        raise ValueError(f"{path} needs 'base' (a training YAML) and 'recipes' (name -> list of key=value)")
    common = _overrides(raw.get("common") or [], f"{path}: common")
    recipes = {}
    for name, overrides in raw["recipes"].items():
        name = str(name)
        if not RECIPE_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"{path}: recipe name {name!r} must be a plain directory name")
        recipes[name] = _overrides(overrides or [], f"{path}: recipe {name}")
        data_changes = [assignment for assignment in recipes[name] if assignment.strip().startswith("data.")]
        if data_changes:
            raise ValueError(f"{path}: recipe {name} changes the data ({data_changes}); the recipes are compared "
                             "on one validation split, so data changes belong in 'common'")
    return Sweep(Path(path), str(raw["base"]), common, recipes)


def _overrides(values, where: str) -> list[str]:
    """`values` checked to be a list of "key=value" strings that leave run_dir to the sweep."""
    if not isinstance(values, list) or not all(isinstance(value, str) and "=" in value for value in values):
        raise ValueError(f"{where}: expected a list of 'key=value' strings, got {values!r}")
    if any(value.partition("=")[0].strip() == "run_dir" for value in values):
        raise ValueError(f"{where}: run_dir is set by the sweep (RUNS_DIR/NAME)")
    return values


# ------------------------------------------------------------------------------------- run
def train_command(sweep: Sweep, name: str, run_dir: Path, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "e2former_calc.train", sweep.base]
    for assignment in [*sweep.overrides(name), f"run_dir={run_dir}"]:
        command += ["--override", assignment]
    return [*command, "--resume"] if resume else command


def run_sweep(sweep: Sweep, runs_dir: Path, names: list[str], resume: bool, threads: int | None) -> dict[str, int]:
    """Train the recipes `names` side by side, one process each; {name: return code} of those started."""
    if not Path(sweep.base).is_file():
        raise SystemExit(f"the sweep's base config {sweep.base} does not exist (paths are relative to the working directory)")
    if not resume:
        existing = [str(runs_dir / name) for name in names if (runs_dir / name).exists()]
        if existing:
            raise SystemExit(f"{', '.join(existing)} exist already: pass --resume to continue, or choose another --runs-dir")
    to_start = {}  # name -> whether it continues from its checkpoint
    for name in names:
        if (runs_dir / name / "test_metrics.json").exists():
            print(f"{name}: finished before (test_metrics.json), skipped")
        else:
            to_start[name] = (runs_dir / name / "checkpoint_latest.pt").exists()
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, len(to_start)))
    child_environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    runs_dir.mkdir(parents=True, exist_ok=True)
    processes = {}
    for name, resuming in to_start.items():
        log_path = runs_dir / f"{name}.log"
        with open(log_path, "a" if resuming else "w") as log:
            processes[name] = subprocess.Popen(train_command(sweep, name, runs_dir / name, resuming),
                                               stdout=log, stderr=subprocess.STDOUT, env=child_environment)
        print(f"{time.strftime('%H:%M:%S')} {name}: {'resumed' if resuming else 'started'} "
              f"(pid {processes[name].pid}, {threads} threads), log {log_path}", flush=True)
    return wait_for_all(processes)


def wait_for_all(processes: dict[str, subprocess.Popen]) -> dict[str, int]:
    """Wait until every process has exited, reporting each as it does; {name: return code}."""
    started, pending, return_codes = time.perf_counter(), dict(processes), {}
    while pending:
        time.sleep(POLL_S)
        for name, process in list(pending.items()):
            if process.poll() is not None:
                return_codes[name] = pending.pop(name).returncode
                print(f"{time.strftime('%H:%M:%S')} {name}: exited with return code {process.returncode} after "
                      f"{(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return return_codes


# ------------------------------------------------------------------------------- summarize
def selection_score(val: dict) -> float:
    """val F MAE / 40 meV/Å + val E MAE / 1 meV/atom (dimensionless; lower is better)."""
    return (val["force_mae_meV_per_A"] / FORCE_MAE_PER_POINT_MEV_PER_A
            + val["energy_mae_meV_per_atom"] / ENERGY_MAE_PER_POINT_MEV_PER_ATOM)


def run_record(run_dir: Path, log_path: Path, return_code: int | None) -> dict:
    """One recipe's entry of the summary; `return_code` is None when this driver did not start it."""
    metrics_log = run_dir / "metrics.jsonl"
    epochs = [json.loads(line) for line in metrics_log.read_text().splitlines()] if metrics_log.exists() else []
    record = {
        "epochs_done": epochs[-1]["epoch"] if epochs else 0,
        "train_minutes": sum(epoch["time_s"] for epoch in epochs) / 60,
    }
    results_path = run_dir / "test_metrics.json"
    if return_code not in (None, 0):
        reason = f"train exited with return code {return_code}"
    elif not results_path.exists():
        reason = "no test_metrics.json in its run_dir (not started, still running, or stopped)"
    else:
        results = json.loads(results_path.read_text())
        return {**record, **results, "selection_score": selection_score(results["val"])}
    log_lines = [line for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    return {**record, "failed": reason, "log_tail": log_lines[-LOG_TAIL_LINES:]}


def data_record(run_dirs: list[Path]) -> dict | None:
    """Data paths, split seed, group_by, stratify_by and split sizes (frames) of the first run that recorded its split."""
    for run_dir in run_dirs:
        if (run_dir / "config.yaml").exists() and (run_dir / "split.json").exists():
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            split = json.loads((run_dir / "split.json").read_text())
            return {"paths": config["data"]["paths"], "split_seed": split["seed"], "group_by": split["group_by"],
                    "stratify_by": split.get("stratify_by"),  # absent from split.json files before stratification
                    "split_sizes": {name: len(split[name]) for name in ("train", "val", "test")}}
    return None


def summarize(sweep: Sweep, runs_dir: Path, names: list[str], out: Path, command: str,
              return_codes: dict[str, int]) -> dict:
    """Collect the runs, choose on the validation split, write `out` and print the table."""
    runs = {name: run_record(runs_dir / name, runs_dir / f"{name}.log", return_codes.get(name)) for name in names}
    scores = {name: run["selection_score"] for name, run in runs.items() if "selection_score" in run}
    chosen = min(scores, key=scores.get) if scores else None
    record = environment()
    summary = {
        "what": f"{len(names)} training recipes of {sweep.base} (sweep {sweep.path}) trained side by side, one "
                f"process each, on {record['device']}; chosen on the validation split by selection_score = "
                "val F MAE / 40 meV/Å + val E MAE / 1 meV/atom; test metrics were read after the choice.",
        **record,
        "command": command,
        "data": data_record([runs_dir / name for name in names]),
        "sweep": str(sweep.path),
        "base": sweep.base,
        "common": sweep.common,
        "recipes": {name: sweep.recipes[name] for name in names},
        "train_command": f"python -m e2former_calc.train {sweep.base} "
                         + "".join(f"--override {assignment} " for assignment in sweep.common)
                         + f"<recipe overrides> --override run_dir={runs_dir}/NAME",
        "selection": SELECTION,
        "chosen": chosen,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    print(f"wrote {out}")
    return summary


def table(summary: dict) -> str:
    """Validation table, the choice, failures, then the test metrics (marked as read after the choice)."""
    runs, chosen = summary["runs"], summary["chosen"]
    rows = [("recipe", "epochs", "minutes", "val E meV/atom", "val F meV/Å", "score")]
    for name, run in runs.items():
        if "failed" in run:
            rows.append((name, str(run["epochs_done"]), f"{run['train_minutes']:.1f}", "-", "-", "failed"))
        else:
            rows.append((name, str(run["epochs_done"]), f"{run['train_minutes']:.1f}",
                         f"{run['val']['energy_mae_meV_per_atom']:.3g}", f"{run['val']['force_mae_meV_per_A']:.4g}",
                         f"{run['selection_score']:.4g}"))
    lines = [_aligned(rows), ""]
    lines += [f"{name} failed: {run['failed']}; last log line: {(run['log_tail'] or ['(no log)'])[-1]}"
              for name, run in runs.items() if "failed" in run]
    if chosen is None:
        return "\n".join([*lines, "no recipe finished: nothing chosen"])
    lines.append(f"chosen on the validation split: {chosen} (selection_score {runs[chosen]['selection_score']:.4g})")
    test_rows = [("recipe", "test E meV/atom", "test F meV/Å")]
    for name, run in runs.items():
        if "test" in run:
            overall = run["test"]["overall"]
            test_rows.append((f"{name}{' (chosen)' if name == chosen else ''}",
                              f"{overall['energy_mae_meV_per_atom']:.3g}", f"{overall['force_mae_meV_per_A']:.4g}"))
    if len(test_rows) > 1:
        lines += ["", "test split, read after the choice (not used for it):", _aligned(test_rows)]
    return "\n".join(lines)


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


# ---------------------------------------------------------------------------------- command
def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    run_parser = steps.add_parser("run", help="train the recipes side by side, then summarize")
    summarize_parser = steps.add_parser("summarize", help="the summary of the run directories alone")
    for step_parser in (run_parser, summarize_parser):
        step_parser.add_argument("sweep", type=Path, help="sweep file (YAML), e.g. benchmarks/sweeps/water_small.yaml")
        step_parser.add_argument("--runs-dir", type=Path, default=Path("runs/sweep"), help="holds NAME/ and NAME.log per recipe")
        step_parser.add_argument("--only", nargs="+", metavar="NAME", help="these recipes only (default: all)")
        step_parser.add_argument("--out", type=Path, help="summary JSON (default RUNS_DIR/summary.json)")
    run_parser.add_argument("--resume", action="store_true",
                            help="skip recipes with test_metrics.json, continue those with checkpoint_latest.pt")
    run_parser.add_argument("--threads", type=int,
                            help="OMP_NUM_THREADS of each training process (default: CPU cores / processes started)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(argv)
    sweep = load_sweep(arguments.sweep)
    names = arguments.only or list(sweep.recipes)
    unknown = sorted(set(names) - set(sweep.recipes))
    if unknown:
        raise SystemExit(f"--only: {unknown} are not recipes of {arguments.sweep} ({sorted(sweep.recipes)})")
    return_codes = {}
    if arguments.step == "run":
        return_codes = run_sweep(sweep, arguments.runs_dir, names, arguments.resume, arguments.threads)
    summary = summarize(sweep, arguments.runs_dir, names, arguments.out or arguments.runs_dir / "summary.json",
                        " ".join([sys.executable, "-m", "benchmarks.train_sweep", *argv]), return_codes)
    return 0 if all("selection_score" in run for run in summary["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
