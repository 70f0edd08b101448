"""MACE (mace-torch) baseline on exactly our water split, for the comparison table of issue 5.

Runs with the system Python (it imports e2former_calc); MACE itself lives in its own virtual
environment (`runs/mace/venv`, mace-torch 0.3.16 pins e3nn 0.4.4, which our tests cannot use), and
is only ever called as a subprocess: its trainer `mace_run_train` and a small evaluation script run
by the venv's Python.

Steps (each a sub-command; `all` runs them in order):

  export     frames of the --our-run directory/split.json -> runs/mace/data/{train,val,test}.extxyz
             (REF_energy / REF_forces, the frame id in `fid`), plus the per-element reference
             energies fitted by least squares on the training split (our own fit, passed as E0s).
  train      waits for our run (test_metrics.json), times a 3-epoch calibration run to turn the
             wall-time budget into an epoch count, then runs mace_run_train with that count.
  evaluate   MACE's ASE calculator (venv) predicts val and test frames with the stage-one and
             stage-two models; the one with the lower validation loss (our training loss formula)
             is reported on the test split: overall and per cluster size, next to our test metrics.

    nohup nice -n 10 python benchmarks/mace_baseline.py all --wait > runs/mace/baseline.log 2>&1 &

Writes benchmarks/results/mace_water_cpu.json (mace_water_gpu.json with --device cuda, where MACE trains
and predicts on the GPU with the same hyper-parameters), or the path given by --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase import Atoms

from e2former_calc.dataset import (
    cluster_size,
    element_counts,
    fit_reference_energies,
    frame_id,
    frame_labels,
)
from e2former_calc.evaluate import metrics_by_size_and_source
from e2former_calc.train import labelled_frames, load_config, training_loss

ROOT = Path(__file__).resolve().parent.parent
OUR_RUN = ROOT / "runs" / "water_small"  # our training run to compare with (--our-run)
WORK = ROOT / "runs" / "mace"
VENV = WORK / "venv"
DATA = WORK / "data"
TRAIN_DIR = WORK / "train"
CALIB_DIR = WORK / "calib"
RESULTS_DIR = ROOT / "benchmarks" / "results"
SPLITS = ("train", "val", "test")
NAME = "mace_water"
SEED = 0

# A small MACE, comparable in cost to our water_small preset on CPU (MACE's own defaults otherwise:
# loss "weighted" with energy weight 1 / forces weight 100 on per-atom energies, AMSGrad lr 0.01,
# ReduceLROnPlateau, float64, stage two (energy weight 1000, lr 1e-3) for the last quarter of epochs).
HYPER = {
    "model": "MACE",
    "hidden_irreps": "32x0e + 32x1o",
    "max_L": 1,
    "r_max": 5.0,
    "num_interactions": 2,
    "correlation": 3,
    "max_ell": 3,
    "num_radial_basis": 8,
    "batch_size": 8,
    "valid_batch_size": 16,
    "lr": 0.01,
    "energy_weight": 1.0,
    "forces_weight": 100.0,
    "ema_decay": 0.99,
    "default_dtype": "float64",
    "device": "cpu",
    "error_table": "PerAtomMAE",
}


def mace_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",  # e3nn 0.4.4 loads its constants with a bare torch.load
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONWARNINGS="ignore",
    )
    return env


# ----------------------------------------------------------------------------- export
def our_frames_by_split() -> dict[str, list[Atoms]]:
    """The frames of each split of our run, in split.json order, checked by frame id, with the labels our run
    trained on (its data.label_correction applied, if any)."""
    config = load_config(OUR_RUN / "config.yaml")
    frames = labelled_frames(config.data, ROOT)
    by_id = {atoms.info["frame_id"]: atoms for atoms in frames}
    split = json.loads((OUR_RUN / "split.json").read_text())
    missing = [i for name in SPLITS for i in split[name] if i not in by_id]
    if missing:
        raise SystemExit(f"{len(missing)} frame ids of split.json are not in the data (first: {missing[0]})")
    return {name: [by_id[i] for i in split[name]] for name in SPLITS}


def export() -> dict:
    DATA.mkdir(parents=True, exist_ok=True)
    subsets = our_frames_by_split()
    for name, frames in subsets.items():
        out = []
        for atoms in frames:
            energy, forces = frame_labels(atoms)
            copy = Atoms(numbers=atoms.get_atomic_numbers(), positions=atoms.get_positions(), pbc=False)
            copy.info["REF_energy"] = energy
            copy.info["fid"] = "id" + atoms.info["frame_id"]  # prefix: an all-digit hex id would be read as a number
            copy.info["n_waters"] = cluster_size(atoms)
            copy.arrays["REF_forces"] = np.asarray(forces, dtype=float)
            out.append(copy)
        path = DATA / f"{name}.extxyz"
        ase.io.write(path, out, format="extxyz")
        # Same frames, same ids: recompute the id from what MACE will read.
        back = ase.io.read(path, index=":", format="extxyz")
        for original, read in zip(frames, back, strict=True):
            if frame_id(read) != original.info["frame_id"] or read.info["fid"] != "id" + original.info["frame_id"]:
                raise SystemExit(f"{path}: frame id changed on the round trip ({original.info['frame_id']})")
            if abs(read.info["REF_energy"] - frame_labels(original)[0]) > 1e-6:
                raise SystemExit(f"{path}: energy changed on the round trip")
        print(f"wrote {path}: {len(out)} frames, {sum(len(a) for a in out)} atoms")

    species = tuple(sorted({int(z) for atoms in subsets["train"] for z in atoms.get_atomic_numbers()}))
    counts = element_counts(subsets["train"], species)
    energies = np.array([frame_labels(atoms)[0] for atoms in subsets["train"]])
    reference, rank = fit_reference_energies(counts, energies)
    e0s = {int(z): float(e) for z, e in zip(species, reference)}
    info = {
        "E0s_eV": e0s,
        "fit": "least squares of total energy on element counts over the training split "
        "(e2former_calc.dataset.fit_reference_energies; minimum-norm when rank-deficient)",
        "rank": rank,
        "residual_rms_meV_per_atom": 1000 * float(np.sqrt(np.mean(((energies - counts @ reference) / counts.sum(1)) ** 2))),
        "split_sizes": {name: len(frames) for name, frames in subsets.items()},
    }
    (DATA / "e0s.json").write_text(json.dumps(info, indent=2))
    print(f"E0s {e0s} (rank {rank})")
    return info


# ----------------------------------------------------------------------------- train
def train_command(work_dir: Path, epochs: int, e0s: dict) -> list[str]:
    args = [str(VENV / "bin" / "mace_run_train"), f"--name={NAME}", f"--seed={SEED}", f"--work_dir={work_dir}"]
    args += [f"--{key}={DATA / f'{split}.extxyz'}" for key, split in
             (("train_file", "train"), ("valid_file", "val"), ("test_file", "test"))]
    args += ["--energy_key=REF_energy", "--forces_key=REF_forces", "--E0s=" + repr({int(k): float(v) for k, v in e0s.items()})]
    args += [f"--{key}={value}" for key, value in HYPER.items()]
    start_swa = max(1, epochs // 4 * 3)
    args += [f"--max_num_epochs={epochs}", "--ema", "--swa", f"--start_swa={start_swa}", "--num_workers=0"]
    return args


def epoch_times(log_path: Path) -> list[tuple[int, float]]:
    """(epoch, unix time) of each validation line in a MACE log: 'Initial' (epoch -1), then 'Epoch N'."""
    out = []
    for line in log_path.read_text().splitlines():
        match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) INFO: (Initial|Epoch (\d+)):", line)
        if match:
            epoch = -1 if match.group(2) == "Initial" else int(match.group(3))
            out.append((epoch, datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()))
    return out


def find_log(work_dir: Path) -> Path:
    logs = sorted((work_dir / "logs").glob("*.log")) if (work_dir / "logs").exists() else []
    logs = [p for p in logs if "debug" not in p.name] or logs
    if not logs:
        raise FileNotFoundError(f"no MACE log under {work_dir}/logs")
    return logs[-1]


def wait_for_our_run(poll_s: float = 60) -> None:
    target = OUR_RUN / "test_metrics.json"
    while not target.exists():
        print(f"{time.strftime('%H:%M:%S')} waiting for {target.relative_to(ROOT)}", flush=True)
        time.sleep(poll_s)
    print(f"{time.strftime('%H:%M:%S')} our run has finished", flush=True)


def run_logged(command: list[str], log: Path, threads: int, hard_limit_s: float | None) -> tuple[int, float, bool]:
    """Run `command` (output to `log`), killing it after `hard_limit_s`. Returns (rc, wall s, killed)."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=mace_env(threads), cwd=WORK)
        killed = False
        while process.poll() is None:
            time.sleep(5)
            if hard_limit_s is not None and time.perf_counter() - start > hard_limit_s:
                process.terminate()
                killed = True
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
    return process.returncode, time.perf_counter() - start, killed


def train(budget_min: float, epochs: int | None, threads: int, wait: bool, deadline: str | None) -> dict:
    e0s = {int(k): v for k, v in json.loads((DATA / "e0s.json").read_text())["E0s_eV"].items()}
    if wait:
        wait_for_our_run()
    asked_min = budget_min
    if deadline is not None:  # HH:MM today, local time: training (calibration included) must end by then
        end = datetime.combine(datetime.now().date(), datetime.strptime(deadline, "%H:%M").time()).timestamp()
        budget_min = min(budget_min, (end - time.time()) / 60 - 2.5)  # 2.5 min: calibration run
        print(f"budget {budget_min:.1f} min (asked {asked_min}, deadline {deadline})", flush=True)
    record = {"budget_min": budget_min, "budget_asked_min": asked_min, "deadline": deadline, "threads": threads}
    if epochs is None:
        if CALIB_DIR.exists():
            subprocess.run(["rm", "-rf", str(CALIB_DIR)], check=True)
        CALIB_DIR.mkdir(parents=True)
        command = train_command(CALIB_DIR, 2, e0s)
        rc, wall, _ = run_logged(command, CALIB_DIR / "stdout.log", threads, 900)
        times = epoch_times(find_log(CALIB_DIR))
        if rc != 0 or len(times) < 3:
            raise SystemExit(f"calibration failed (rc {rc}); see {CALIB_DIR}/stdout.log")
        # From the initial validation to the last epoch's: seconds per epoch, validation included;
        # setup_s: start-up plus MACE's closing evaluation (model export, error tables).
        per_epoch = (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0])
        setup_s = wall - per_epoch * (times[-1][0] + 1)
        epochs = max(8, int((budget_min * 60 - max(setup_s, 0)) / per_epoch))
        record["calibration"] = {"command": shlex.join(command), "wall_s": wall, "s_per_epoch": per_epoch, "setup_s": setup_s}
        print(f"calibration: {per_epoch:.1f} s/epoch, setup {setup_s:.0f} s -> {epochs} epochs", flush=True)
    if TRAIN_DIR.exists():
        subprocess.run(["rm", "-rf", str(TRAIN_DIR)], check=True)
    TRAIN_DIR.mkdir(parents=True)
    command = train_command(TRAIN_DIR, epochs, e0s)
    print(f"{time.strftime('%H:%M:%S')} training: {shlex.join(command)}", flush=True)
    rc, wall, killed = run_logged(command, TRAIN_DIR / "stdout.log", threads, budget_min * 60 * 1.5 + 300)
    record.update(driver="nohup nice -n 10 python " + shlex.join(["benchmarks/mace_baseline.py", *sys.argv[1:]]) + " > runs/mace/baseline.log 2>&1 &",
                  command=shlex.join(command), max_num_epochs=epochs, start_swa=max(1, epochs // 4 * 3),
                  returncode=rc, wall_s=wall, killed_at_hard_limit=killed)
    (TRAIN_DIR / "run_record.json").write_text(json.dumps(record, indent=2))
    print(f"{time.strftime('%H:%M:%S')} training finished: rc {rc}, {wall / 60:.1f} min, killed={killed}", flush=True)
    return record


# ----------------------------------------------------------------------------- evaluate
EVAL_SCRIPT = '''\
import json, sys
import ase.io, numpy as np, torch
from mace.calculators import MACECalculator
device, model_path, out_path, *xyz_paths = sys.argv[1:]
calc = MACECalculator(model_paths=model_path, device=device, default_dtype="float64")
result = {"n_parameters": int(sum(p.numel() for p in calc.models[0].parameters()))}
for path in xyz_paths:
    energies, forces = [], []
    for atoms in ase.io.read(path, index=":", format="extxyz"):
        atoms.calc = calc
        energies.append(float(atoms.get_potential_energy()))
        forces.append(atoms.get_forces().tolist())
    result[path] = {"energy": energies, "forces": forces}
json.dump(result, open(out_path, "w"))
'''


def predict(model_path: Path, splits: tuple[str, ...], threads: int) -> dict:
    script = WORK / "eval_mace.py"
    script.write_text(EVAL_SCRIPT)
    out = WORK / f"pred_{model_path.stem}.json"
    paths = [str(DATA / f"{name}.extxyz") for name in splits]
    subprocess.run([str(VENV / "bin" / "python"), str(script), HYPER["device"], str(model_path), str(out), *paths],
                   check=True, env=mace_env(threads), cwd=WORK)
    raw = json.loads(out.read_text())
    return {"n_parameters": raw["n_parameters"], **{name: raw[path] for name, path in zip(splits, paths)}}


def metrics_for(frames: list[Atoms], prediction: dict, loss) -> dict:
    """Our metric definitions (e2former_calc.evaluate), overall, per cluster size and per source, with our training loss."""
    energy_error = torch.tensor([p - frame_labels(a)[0] for p, a in zip(prediction["energy"], frames, strict=True)], dtype=torch.float64)
    force_error = torch.cat([torch.tensor(p, dtype=torch.float64) - torch.as_tensor(frame_labels(a)[1])
                             for p, a in zip(prediction["forces"], frames)])
    return metrics_by_size_and_source(frames, energy_error, force_error, training_loss(loss))


def versions() -> dict:
    code = "import importlib.metadata as m, sys; print(__import__('json').dumps({p: m.version(p) for p in ('mace-torch', 'torch', 'e3nn', 'ase')} | {'python': sys.version.split()[0]}))"
    venv = json.loads(subprocess.run([str(VENV / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True,
                                     env=mace_env(1)).stdout)
    from importlib.metadata import version
    return {"mace_venv": venv, "system": {"python": platform.python_version(), "torch": torch.__version__,
                                          "e3nn": version("e3nn"), "e2former_calc": version("e2former_calc")}}


def validation_history(log_path: Path) -> list[str]:
    return [line.split("INFO: ", 1)[1] for line in log_path.read_text().splitlines() if re.search(r"INFO: Epoch \d+:", line)]


def evaluate(threads: int, out: Path | None = None) -> dict:
    """Predict val and test with both MACE stages; write the results JSON to `out` (default: by device)."""
    config = load_config(OUR_RUN / "config.yaml")
    subsets = our_frames_by_split()
    # The exported files must still hold exactly these frames.
    for name in ("val", "test"):
        read = ase.io.read(DATA / f"{name}.extxyz", index=":", format="extxyz")
        if [frame_id(a) for a in read] != [a.info["frame_id"] for a in subsets[name]]:
            raise SystemExit(f"{DATA}/{name}.extxyz no longer matches split.json")
    candidates = {}
    for stage, filename in (("stage_one", f"{NAME}.model"), ("stage_two", f"{NAME}_stagetwo.model")):
        path = TRAIN_DIR / filename
        if not path.exists():
            continue
        prediction = predict(path, ("val", "test"), threads)
        candidates[stage] = {
            "model_file": str(path.relative_to(ROOT)),
            "n_parameters": prediction["n_parameters"],
            "val": metrics_for(subsets["val"], prediction["val"], config.loss)["overall"],
            "test": metrics_for(subsets["test"], prediction["test"], config.loss),
        }
        print(f"{stage}: val {candidates[stage]['val']}", flush=True)
    if not candidates:
        raise SystemExit(f"no trained MACE model in {TRAIN_DIR}")
    chosen = min(candidates, key=lambda stage: candidates[stage]["val"]["loss"])

    run_record = json.loads((TRAIN_DIR / "run_record.json").read_text()) if (TRAIN_DIR / "run_record.json").exists() else {}
    log = find_log(TRAIN_DIR)
    history = validation_history(log)
    ours_path = OUR_RUN / "test_metrics.json"
    ours = json.loads(ours_path.read_text()) if ours_path.exists() else None
    metrics_path = OUR_RUN / "metrics.jsonl"
    our_epochs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.exists() else []
    results = {
        "what": "MACE (mace-torch) trained and evaluated on exactly the train/val/test split of the --our-run directory "
        "(frame ids from split.json, e2former_calc.dataset.frame_id); metrics as in e2former_calc.evaluate.error_metrics: "
        "energy error per atom (meV/atom), force components (meV/Å); the 'loss' entries use our training loss "
        f"({config.loss.kind}, energy weight {config.loss.energy_weight}, force weight {config.loss.force_weight}).",
        "selection": f"of MACE's stage-one and stage-two (EMA) models, the one with the lower validation loss (ours): {chosen}",
        "versions": versions(),
        "machine": {"device": HYPER["device"], "cpu_count": os.cpu_count(), "threads": run_record.get("threads"),
                    "gpu": torch.cuda.get_device_name() if HYPER["device"] == "cuda" else None},
        "data": json.loads((DATA / "e0s.json").read_text()),
        "hyper_parameters": HYPER | {"max_num_epochs": run_record.get("max_num_epochs"), "start_swa": run_record.get("start_swa"),
                                     "ema": True, "swa": True, "E0s": "our least-squares fit on the training split (see data)"},
        "commands": {
            "driver": "nohup nice -n 10 python " + shlex.join(["benchmarks/mace_baseline.py", *sys.argv[1:]]) + " > runs/mace/baseline.log 2>&1 &"
            if sys.argv[1:2] == ["all"] else run_record.get("driver"),
            "calibration": run_record.get("calibration", {}).get("command"),
            "train": run_record.get("command"),
            "evaluate": f"{VENV.relative_to(ROOT)}/bin/python runs/mace/eval_mace.py {HYPER['device']} MODEL OUT runs/mace/data/val.extxyz runs/mace/data/test.extxyz",
        },
        "training": {
            "wall_s": run_record.get("wall_s"),
            "returncode": run_record.get("returncode"),
            "killed_at_hard_limit": run_record.get("killed_at_hard_limit"),
            "calibration": run_record.get("calibration"),
            "epochs_logged": len(history),
            "last_validation_lines": history[-3:],
            "log": str(log.relative_to(ROOT)),
        },
        "mace": {"chosen": chosen, **candidates[chosen]},
        "mace_candidates": {stage: {"val": c["val"], "test_overall": c["test"]["overall"]} for stage, c in candidates.items()},
        "ours": {"source": str(ours_path.relative_to(ROOT)), "test": ours.get("test"), "val": ours.get("val"),
                 "best_epoch": ours.get("best_epoch"), "force_mode": ours.get("force_mode"),
                 "epochs_logged": len(our_epochs), "training_wall_s_sum_of_epochs": sum(e.get("time_s", 0) for e in our_epochs)}
        if ours else None,
    }
    path = out or RESULTS_DIR / f"mace_water_{'gpu' if HYPER['device'] == 'cuda' else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {path}")
    return results


def table(results: dict) -> str:
    keys = ("energy_mae_meV_per_atom", "force_mae_meV_per_A", "force_rmse_meV_per_A", "n_frames")
    rows = [("", "E MAE meV/atom", "F MAE meV/Å", "F RMSE meV/Å", "frames")]
    sources = [("MACE", results["mace"]["test"])]
    if results["ours"] and results["ours"]["test"]:
        sources.append(("E2Former", results["ours"]["test"]))
    for label, test in sources:
        rows.append((f"{label} all", *(f"{test['overall'][k]:.4g}" for k in keys)))
    for size in results["mace"]["test"]["per_cluster_size"]:
        for label, test in sources:
            if size in test["per_cluster_size"]:
                rows.append((f"{label} {size}", *(f"{test['per_cluster_size'][size][k]:.4g}" for k in keys)))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, width)) for r in rows)


def main() -> None:
    global OUR_RUN, VENV
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["export", "train", "evaluate", "all"])
    parser.add_argument("--budget-min", type=float, default=27.0, help="training wall-time budget (minutes)")
    parser.add_argument("--epochs", type=int, default=None, help="skip the calibration and train this many epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--our-run", type=Path, default=OUR_RUN, help="our training run directory (split.json, test_metrics.json)")
    parser.add_argument("--deadline", default=None, help="HH:MM (local): shrink the budget so training ends by then")
    parser.add_argument("--wait", action="store_true", help="poll for our run's test_metrics.json before training")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where MACE trains and predicts")
    parser.add_argument("--venv", type=Path, default=VENV, help="environment with mace-torch (bin/python, bin/mace_run_train)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/mace_water_{cpu,gpu}.json)")
    args = parser.parse_args()
    OUR_RUN, VENV = args.our_run.resolve(), args.venv.resolve()
    HYPER["device"] = args.device
    if args.step in ("export", "all"):
        export()
    if args.step in ("train", "all"):
        train(args.budget_min, args.epochs, args.threads, args.wait, args.deadline)
    if args.step in ("evaluate", "all"):
        evaluate(args.threads, args.out)


if __name__ == "__main__":
    sys.exit(main())
