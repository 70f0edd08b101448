"""NVT liquid water with the shipped E2Former-V2 model, then g_OO(r) against experiment.

    python examples/water_nvt.py --quick                    # 64 waters, 0.75 ps: minutes on a CPU
    python examples/water_nvt.py --full --max-minutes 8     # 216 waters, 10 + 50 ps on a GPU, in chunks

Stages: a short FIRE relaxation of the built box, an equilibration with a tightly coupled Bussi
thermostat (it removes the heat the relaxing box releases), then production in --ensemble
(Nosé–Hoover chain by default) continuing from the equilibrated momenta. Every stage writes
restart files, so re-running the same command resumes where the last one stopped; with
--max-minutes an invocation stops its MD once that much wall-clock time has passed since it
started (saving its state), then analyses what production exists so far and exits normally.
--equilibration-ps / --production-ps shorten (or lengthen) a mode; the outputs always state
the picoseconds actually run.

Writes to --output (default runs/water_nvt_quick or runs/water_nvt_full):
  equilibration/, production/      trajectory.extxyz, md.log, restart.npz of each stage (frames
                                   every --trajectory-interval steps in production, 10 times
                                   sparser in equilibration; log lines every --trajectory-interval),
  rdf.csv, rdf_metrics.json, rdf.png   g_OO(r) of the production frames so far vs Skinner 2013,
  run.json                         settings, model, per-invocation timings, the ps done per
                                   stage, temperatures, MD speed (ns/day), whether the waters
                                   stayed whole (molecular_integrity of the production frames)
                                   and whether the run is complete.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.io import iread
from ase.optimize import FIRE

from e2former_calc import E2FormerCalculator
from e2former_calc.active_learning import HH_CONTACT, molecular_integrity
from e2former_calc.calculator import md_acceleration
from e2former_calc.checkpoint import PRETRAINED_DIR, registered_models
from e2former_calc.cli import add_acceleration_arguments, rigid_tip3p_water
from e2former_calc.md import RESTART_NAME, MDWatchdogError, read_md_log, run_md
from e2former_calc.provenance import source_commit
from e2former_calc.rdf import compare_with_experiment, compute_rdf, load_experimental_rdf, plot_rdf, write_rdf_csv
from e2former_calc.water import build_water_box

MODES = {
    # quick: a CPU demonstration (~1500 force evaluations, ~0.1 s each on 2 cores); far too short for
    # converged structure.
    "quick": dict(waters=64, relax_steps=20, equilibration_ps=0.25, production_ps=0.5, trajectory_interval=20,
                  restart_interval=100),
    # full: the paper's system.
    "full": dict(waters=216, relax_steps=50, equilibration_ps=10.0, production_ps=50.0, trajectory_interval=100,
                 restart_interval=1000),
}
EQUILIBRATION_FRAME_SPACING = 10  # the equilibration keeps a frame every 10 trajectory intervals
STOPPED = "stopped: --max-minutes used up; run the same command again to resume"
RELAX_FMAX = 0.5  # eV/Å: the relaxation only removes the worst contacts of the built box
STAGES = ("equilibration", "production")
# Settings a resumed run must share with the run it continues (the targets may change).
IDENTITY = ("mode", "waters", "model", "weights_sha256", "dtype", "temperature_K", "timestep_fs", "seed",
            "ensemble", "coupling_time_fs", "equilibration_coupling_time_fs", "relax_steps")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_const", dest="mode", const="quick")
    size.add_argument("--full", action="store_const", dest="mode", const="full")
    parser.add_argument("--model", default="e2former-v2-water-s",
                        help="shipped model name or checkpoint path, or 'tip3p' (ASE's rigid TIP3P stand-in)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    add_acceleration_arguments(parser)
    parser.add_argument("--ensemble", default="nose-hoover", choices=("nose-hoover", "bussi", "langevin"),
                        help="production thermostat")
    parser.add_argument("--coupling-time", type=float, default=100.0, help="production thermostat time, fs")
    parser.add_argument("--equilibration-coupling-time", type=float, default=10.0,
                        help="Bussi time constant of the equilibration, fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--waters", type=int, help="molecules in the box (default: the mode's)")
    parser.add_argument("--relax-steps", type=int, help="FIRE steps before MD (default: the mode's)")
    parser.add_argument("--equilibration-ps", type=float, help="equilibration length (default: the mode's)")
    parser.add_argument("--production-ps", type=float, help="production length (default: the mode's)")
    parser.add_argument("--trajectory-interval", type=int, help="steps between saved frames (default: the mode's)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop the MD of this invocation after this much wall-clock time (resume later)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--no-progress", action="store_true")
    arguments = parser.parse_args(argv)
    for name, value in MODES[arguments.mode].items():
        if getattr(arguments, name, None) is None:
            setattr(arguments, name, value)
    if arguments.model.lower() == "tip3p":
        arguments.cuda_graph = "off"
    arguments.skin, graphed = md_acceleration(arguments.device, arguments.skin, arguments.cuda_graph)
    arguments.cuda_graph = "on" if graphed else "off"
    arguments.output = arguments.output or Path("runs") / f"water_nvt_{arguments.mode}"
    return arguments


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_arguments(argv)
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    record = _start_record(args, output / "run.json")
    steps_per_ps = 1000.0 / args.timestep
    targets = {"equilibration": round(args.equilibration_ps * steps_per_ps),
               "production": round(args.production_ps * steps_per_ps)}
    _refuse_changed_equilibration(output, targets["equilibration"])

    atoms = build_water_box(args.waters, seed=args.seed)
    if args.model.lower() == "tip3p":
        rigid_tip3p_water(atoms)
    else:
        atoms.calc = E2FormerCalculator(model=args.model, device=args.device, dtype=args.dtype, skin=args.skin,
                                        cuda_graph=args.cuda_graph == "on")
    invocation = {"started_utc": _now(), "device": _device_name(atoms.calc), "max_minutes": args.max_minutes,
                  "cuda_graph": args.cuda_graph == "on", **_environment(argv), "stages": {}}
    record["invocations"].append(invocation)
    if not (output / "equilibration" / RESTART_NAME).exists():
        record["relaxation"] = _relax(atoms, args.relax_steps, output / "relax.log")

    # Every invocation makes progress: a stage runs at least one step before the budget is checked.
    status, progressed = "complete", False
    for stage in STAGES:
        remaining = None if args.max_minutes is None else args.max_minutes * 60 - (time.monotonic() - started)
        if remaining is not None and remaining <= 0 and progressed and not _stage_done(output / stage, targets[stage]):
            status = STOPPED
            break
        equilibrating = stage == "equilibration"
        try:
            result = run_md(
                atoms,
                "bussi" if equilibrating else args.ensemble,
                args.temperature,
                args.timestep,
                targets[stage],
                output / stage,
                seed=args.seed,
                trajectory_interval=args.trajectory_interval * (EQUILIBRATION_FRAME_SPACING if equilibrating else 1),
                log_interval=args.trajectory_interval,
                restart_interval=args.restart_interval,
                coupling_time_fs=args.equilibration_coupling_time if equilibrating else args.coupling_time,
                progress=not args.no_progress,
                keep_momenta=not equilibrating,
                max_seconds=None if remaining is None else max(remaining, 0.0),
            )
        except MDWatchdogError as error:
            status = f"failed: {error}"
            print(status, file=sys.stderr)
            break
        steps_run = result.steps - result.started_from_step
        progressed = progressed or steps_run > 0
        invocation["stages"][stage] = {"steps": steps_run, "seconds": result.elapsed_s}
        print(f"{stage}: steps {result.started_from_step} -> {result.steps} of {targets[stage]} "
              f"in {result.elapsed_s:.0f} s, T = {result.final_temperature_K:.0f} K")
        if not result.completed:
            status = STOPPED
            break

    invocation["wall_s"] = time.monotonic() - started
    record["status"] = status
    record["complete"] = status == "complete"
    record["stages"] = {stage: _stage_summary(output / stage, targets[stage], args.timestep) for stage in STAGES}
    record["speed"] = _speed(record["invocations"], args.timestep)
    _analyse(output, args, record)
    (output / "run.json").write_text(json.dumps(record, indent=1))
    print(f"{status}; wrote {output}/run.json")
    return 0 if not status.startswith("failed") else 2


def _start_record(args: argparse.Namespace, path: Path) -> dict:
    """run.json's settings for this invocation, with the earlier invocations of the same run.

    Raises SystemExit if `path` belongs to a run with other settings (see IDENTITY)."""
    settings = {
        "mode": args.mode, "waters": args.waters, "model": args.model, "weights_sha256": _weights_sha256(args.model),
        "dtype": args.dtype, "temperature_K": args.temperature, "timestep_fs": args.timestep, "seed": args.seed,
        "ensemble": args.ensemble, "coupling_time_fs": args.coupling_time,
        "equilibration_coupling_time_fs": args.equilibration_coupling_time, "relax_steps": args.relax_steps,
        "relax_fmax_eV_per_A": RELAX_FMAX, "equilibration_thermostat": "bussi",
        "target_equilibration_ps": args.equilibration_ps, "target_production_ps": args.production_ps,
        "trajectory_interval": args.trajectory_interval, "skin_A": args.skin,
    }
    record = {"settings": settings, "invocations": []}
    if path.exists():
        previous = json.loads(path.read_text())
        changed = [key for key in IDENTITY if previous["settings"].get(key) != settings[key]]
        if settings["weights_sha256"] is not None and "weights_sha256" not in changed and "model" in changed:
            changed.remove("model")  # the same weights under another name (a run path, the registry name)
        if changed:
            raise SystemExit(
                f"{path.parent} holds a run with other settings ({', '.join(changed)}: "
                f"{[previous['settings'].get(key) for key in changed]}); use another --output"
            )
        record["invocations"] = previous["invocations"]
        if "relaxation" in previous:
            record["relaxation"] = previous["relaxation"]
    return record


def _refuse_changed_equilibration(output: Path, target_steps: int) -> None:
    """Production continues from the end of the equilibration: once it has begun, the
    equilibration must stay as long as it was."""
    if not (output / "production" / RESTART_NAME).exists():
        return
    done = _restart_step(output / "equilibration")
    if done != target_steps:
        raise SystemExit(
            f"production already started from an equilibration of {done} steps; "
            f"--equilibration-ps must stay at that length ({target_steps} steps asked)"
        )


def _relax(atoms, steps: int, log_path: Path) -> dict:
    """FIRE on the positions for at most `steps` steps or until max |F| < RELAX_FMAX."""
    energy_before = atoms.get_potential_energy()
    fmax_before = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    optimizer = FIRE(atoms, maxstep=0.1, logfile=str(log_path))
    optimizer.run(fmax=RELAX_FMAX, steps=steps)
    return {
        "steps": int(optimizer.nsteps),
        "energy_change_eV": float(atoms.get_potential_energy() - energy_before),
        "fmax_before_eV_per_A": fmax_before,
        "fmax_after_eV_per_A": float(np.linalg.norm(atoms.get_forces(), axis=1).max()),
    }


def _restart_step(stage_dir: Path) -> int:
    """The last step saved in a stage's restart file (0 when the stage has not begun)."""
    path = stage_dir / RESTART_NAME
    if not path.exists():
        return 0
    with np.load(path) as archive:
        return int(json.loads(str(archive["scalars_json"]))["step"])


def _stage_done(stage_dir: Path, target_steps: int) -> bool:
    return (stage_dir / RESTART_NAME).exists() and _restart_step(stage_dir) >= target_steps


def _stage_summary(stage_dir: Path, target_steps: int, timestep_fs: float) -> dict:
    """Steps and ps done against the target, and the temperature statistics of the log."""
    steps = _restart_step(stage_dir)
    summary = {"steps_done": steps, "ps_done": steps * timestep_fs / 1000,
               "target_ps": target_steps * timestep_fs / 1000, "complete": steps >= target_steps}
    if (stage_dir / "md.log").exists():
        columns, _ = read_md_log(stage_dir / "md.log")
        temperatures = columns["temperature_K"][columns["step"] > 0]
        if len(temperatures):
            summary.update(final_temperature_K=float(temperatures[-1]), mean_temperature_K=float(temperatures.mean()),
                           std_temperature_K=float(temperatures.std()))
    return summary


def _speed(invocations: list[dict], timestep_fs: float) -> dict:
    """MD throughput over all invocations: ns/day per stage (wall clock of the MD loop,
    trajectory output included; the first steps of a GPU run include kernel compilation)."""
    speed = {}
    for stage in STAGES:
        steps = sum(inv["stages"].get(stage, {}).get("steps", 0) for inv in invocations)
        seconds = sum(inv["stages"].get(stage, {}).get("seconds", 0.0) for inv in invocations)
        if steps and seconds:
            speed[stage] = {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
                            "ns_per_day": steps * timestep_fs * 1e-6 / (seconds / 86400)}
    return speed


def _analyse(output: Path, args: argparse.Namespace, record: dict) -> None:
    """g_OO(r) of the production frames written so far (needs at least two), and whether the waters stayed whole."""
    trajectory = output / "production" / "trajectory.extxyz"
    frames = list(iread(trajectory)) if trajectory.exists() and trajectory.stat().st_size else []
    if len(frames) < 2:
        record["rdf"] = None
        return
    production = record["stages"]["production"]
    rdf = compute_rdf(frames, pair=("O", "O"))
    experiment = load_experimental_rdf("skinner2013")
    metrics = compare_with_experiment(rdf, experiment)
    metrics.update(production_ps=production["ps_done"], target_production_ps=production["target_ps"],
                   complete=record["complete"])
    write_rdf_csv(output / "rdf.csv", rdf)
    plot_rdf(output / "rdf.png", rdf, experiment,
             label=f"{args.model}, {args.temperature:.0f} K, {production['ps_done']:.3g} ps")
    (output / "rdf_metrics.json").write_text(json.dumps(metrics, indent=1))
    record["rdf"] = {"frames": len(frames), "production_ps": production["ps_done"]}
    record["molecular_integrity"] = integrity = molecular_integrity(frames)
    model = metrics["model"]
    print(f"g_OO(r) over {production['ps_done']:.3g} ps of production ({len(frames)} frames): first peak "
          f"{model['first_peak_position_angstrom']:.3f} Å, height {model['first_peak_height']:.2f}, "
          f"RMSE {metrics['rmse']:.3f} (2.5-{metrics['rmse_range_angstrom'][1]:.2f} Å)")
    print(f"molecules: longest O-H {integrity['longest_OH_bond_angstrom']:.2f} Å, shortest O···H between molecules "
          f"{integrity['shortest_intermolecular_OH_angstrom']:.2f} Å, {integrity['frames_with_broken_water']} frames "
          f"with a broken water; shortest H···H between molecules {integrity['shortest_intermolecular_HH_angstrom']:.2f} Å, "
          f"{integrity['HH_contacts_per_frame']:.2g} pairs closer than {HH_CONTACT} Å per frame")


def _weights_sha256(model: str) -> str | None:
    """The weights' sha256 recorded in the checkpoint JSON (None for TIP3P)."""
    if model.lower() == "tip3p":
        return None
    registry = registered_models()
    if model in registry:
        json_path = PRETRAINED_DIR / f"{registry[model]['checkpoint']}.json"
    else:
        json_path = Path(model).with_suffix(".json")
    return json.loads(json_path.read_text()).get("weights_sha256")


def _device_name(calculator) -> str:
    device = getattr(calculator, "device", torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _environment(argv: list[str] | None) -> dict:
    """Commit, command line and versions of this invocation."""
    arguments = sys.argv[1:] if argv is None else argv
    return {"commit": source_commit(), "command": " ".join(["python", "examples/water_nvt.py", *arguments]),
            "python": platform.python_version(), "torch": torch.__version__}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
