"""MD speed (ns/day) and NVE energy drift of the 216-water box (648 atoms) with the shipped model.

    python -m benchmarks.md_speed --out $OUT            # on the GPU (device "auto")
    python -m benchmarks.md_speed --smoke --out /tmp    # a tiny run on the CPU, to check the script

Protocol: build the box (e2former_calc.water, --seed), load --model by name (float32,
conservative forces) into E2FormerCalculator, relax --relax-steps FIRE steps (or start from
--initial, e.g. the last frame of an equilibration). Then:

1. speed: for each --skins value (Verlet skin, Å; 0 searches neighbours every step), NVT with
   Bussi (10 fs) at 0.5 fs through e2former_calc.md.run_md (trajectory every 100 steps, as in
   the full example): --warmup steps (kernel compilation), then --steps timed steps, resumed
   from the warm-up's restart file; steps/s and ns/day = steps/s x timestep x 86400. Then the
   same for each --cuda-graph-skins value with E2FormerCalculator(cuda_graph=True) (one CUDA
   graph captured per neighbour search, replayed in between; CUDA only).
2. breakdown, at the last configuration: one graph build, one model forward + backward, one
   whole calculator call (CUDA-event timed means), and with --profile-steps > 0 the top
   operators of a torch.profiler trace of that many calculator calls.
3. drift: NVE (velocity Verlet, 0.5 fs) for --nve-ps from the end of the NVT run, with the
   fastest configuration; Etot(t) logged every 10 steps, least-squares slope in meV/atom/ps with its
   standard error, and the RMS of Etot about the line.

Prints a table and writes the numbers with the environment (device, date, commit, command) to
--out (a directory, default $OUT, gets md_speed.json; a path ending in .json is used as is).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase.io import read
from ase.optimize import FIRE

from benchmarks.common import environment, time_cuda
from e2former_calc import E2FormerCalculator
from e2former_calc.md import read_md_log, run_md
from e2former_calc.water import build_water_box

NVT_COUPLING_FS = 10.0
TRAJECTORY_INTERVAL = 100
NVE_LOG_INTERVAL = 10
SMOKE = dict(waters=8, skins=[0.0, 1.0], warmup=2, steps=6, nve_ps=0.02, relax_steps=2, profile_steps=2,
             device="cpu")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e2former-v2-water-s", help="shipped model name or checkpoint path")
    parser.add_argument("--waters", type=int, default=216)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--skins", type=float, nargs="+", default=[0.0, 1.0], help="Verlet skins to time, Å")
    parser.add_argument("--cuda-graph-skins", type=float, nargs="*", default=None,
                        help="skins to time with E2FormerCalculator(cuda_graph=True) (default: 0.5 1.0 1.5 on CUDA)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed NVT steps per skin")
    parser.add_argument("--steps", type=int, default=400, help="timed NVT steps per skin")
    parser.add_argument("--nve-ps", type=float, default=1.0, help="NVE length for the drift, ps")
    parser.add_argument("--relax-steps", type=int, default=20, help="FIRE steps on the built box")
    parser.add_argument("--initial", type=Path, help="start from the positions of this frame (any ASE format)")
    parser.add_argument("--profile-steps", type=int, default=5, help="calculator calls to profile (0: none)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run that checks the script")
    arguments = parser.parse_args()
    if arguments.smoke:
        for name, value in SMOKE.items():
            setattr(arguments, name, value)
    return arguments


def main() -> None:
    args = parse_arguments()
    out = args.out if args.out.suffix == ".json" else args.out / "md_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atoms, start = starting_state(args)
    results = {"environment": environment(), "protocol": {key: str(value) if isinstance(value, Path) else value
                                                         for key, value in vars(args).items()}}
    results["system"] = {"n_atoms": len(atoms), "box_A": float(atoms.cell[0, 0]), "start": start}

    results["system"]["n_edges"] = atoms.calc.graph_builder(atoms)[0].num_edges
    start_positions = atoms.get_positions()
    with tempfile.TemporaryDirectory() as scratch:
        graph_skins = args.cuda_graph_skins
        if graph_skins is None:
            graph_skins = [0.5, 1.0, 1.5] if atoms.calc.device.type == "cuda" else []
        rows = []
        # each from the same positions and seeded momenta; NVE goes on from the fastest's end state
        for skin, graphed in [(skin, False) for skin in args.skins] + [(skin, True) for skin in graph_skins]:
            atoms.set_positions(start_positions)
            atoms.calc = E2FormerCalculator(args.model, device=args.device, dtype=args.dtype, skin=skin, cuda_graph=graphed)
            rows.append(time_nvt(atoms, skin, args, Path(scratch) / f"nvt_skin_{skin}_{graphed}"))
        results["device"] = str(atoms.calc.device)
        results["nvt_speed"] = rows
        fastest = max(rows, key=lambda row: row["steps_per_s"])
        atoms.calc = E2FormerCalculator(args.model, device=args.device, dtype=args.dtype, skin=fastest["skin_A"])
        results["breakdown"] = breakdown(atoms.calc, atoms, args.profile_steps)
        atoms.calc = E2FormerCalculator(args.model, device=args.device, dtype=args.dtype, skin=fastest["skin_A"],
                                        cuda_graph=fastest["cuda_graph"])
        results["nve"] = {**nve_drift(atoms, args, Path(scratch) / "nve", fastest["skin_A"]), "cuda_graph": fastest["cuda_graph"]}

    out.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"wrote {out}")


def starting_state(args: argparse.Namespace):
    """The box to start from, with a calculator: --initial's positions, or the built box after
    a short FIRE relaxation."""
    if args.initial is not None:
        atoms, start = read(args.initial), f"positions of {args.initial}"
    else:
        atoms = build_water_box(args.waters, seed=args.seed)
        start = f"build_water_box({args.waters}, seed={args.seed}) after {args.relax_steps} FIRE steps"
    atoms.calc = E2FormerCalculator(args.model, device=args.device, dtype=args.dtype)
    if args.initial is None:
        FIRE(atoms, maxstep=0.1, logfile=None).run(fmax=0.5, steps=args.relax_steps)
    return atoms, start


def time_nvt(atoms, skin: float, args: argparse.Namespace, directory: Path) -> dict:
    """Warm-up (momenta drawn from the seed), then timed NVT steps resumed from the warm-up's
    restart file; `atoms` ends in the state after the timed steps."""
    common = dict(ensemble="bussi", temperature_K=args.temperature, timestep_fs=args.timestep,
                  output_dir=directory, seed=args.seed, trajectory_interval=TRAJECTORY_INTERVAL,
                  log_interval=TRAJECTORY_INTERVAL, restart_interval=10**9, coupling_time_fs=NVT_COUPLING_FS,
                  progress=False)
    run_md(atoms, steps=args.warmup, **common)
    if atoms.calc.device.type == "cuda":
        torch.cuda.synchronize()
    timed = run_md(atoms, steps=args.warmup + args.steps, **common)
    steps_per_s = args.steps / timed.elapsed_s
    row = {
        "skin_A": skin, "cuda_graph": atoms.calc.captured is not None, "steps": args.steps,
        "seconds": timed.elapsed_s, "steps_per_s": steps_per_s,
        "ms_per_step": 1000 / steps_per_s, "ns_per_day": steps_per_s * args.timestep * 1e-6 * 86400,
        "neighbour_searches": atoms.calc.graph_builder.searches, "final_temperature_K": timed.final_temperature_K,
    }
    return row


def breakdown(calc: E2FormerCalculator, atoms, profile_steps: int) -> dict:
    """Mean ms of a graph build, a model forward + backward, and a whole calculator call."""
    repeats = 20

    def calculator_call():
        calc.calculate(atoms, ["energy", "forces"])

    def model_call():
        calc.model(graph, compute_forces=True, compute_stress=False, mode="conservative")

    graph, _ = calc.graph_builder(atoms)
    timings = {
        "graph_ms": 1000 * time_cuda(lambda: calc.graph_builder(atoms), warmup=3, repeats=repeats),
        "model_forward_backward_ms": 1000 * time_cuda(model_call, warmup=3, repeats=repeats),
        "calculator_call_ms": 1000 * time_cuda(calculator_call, warmup=3, repeats=repeats),
        "note": "graph_ms with a skin is the per-step filter of the stored list (no search)",
    }
    if profile_steps > 0:
        timings["profile"] = profile(calculator_call, profile_steps, calc.device)
    return timings


def profile(function, calls: int, device: torch.device) -> str:
    """The top 25 operators by self time (device time on CUDA) over `calls` calls, as a table."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize()
    averages = profiler.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)):
        try:
            return averages.table(sort_by=key, row_limit=25)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=25)


def nve_drift(atoms, args: argparse.Namespace, directory: Path, skin: float) -> dict:
    """NVE from the current state (its momenta kept); drift of Etot in meV/atom/ps."""
    steps = round(args.nve_ps * 1000 / args.timestep)
    start = time.perf_counter()
    result = run_md(atoms, "nve", args.temperature, args.timestep, steps, directory, seed=args.seed,
                    trajectory_interval=10**9, log_interval=NVE_LOG_INTERVAL, restart_interval=10**9,
                    progress=False, keep_momenta=True)
    columns, n_atoms = read_md_log(result.log_path)
    time_ps, etot = columns["time_ps"], columns["etot_eV"]
    (slope, intercept), covariance = np.polyfit(time_ps, etot, 1, cov=True)
    residual = etot - (slope * time_ps + intercept)
    to_meV_per_atom = 1000.0 / n_atoms
    return {
        "skin_A": skin, "steps": steps, "ps": steps * args.timestep / 1000, "seconds": time.perf_counter() - start,
        "drift_meV_per_atom_ps": slope * to_meV_per_atom,
        "drift_standard_error_meV_per_atom_ps": float(np.sqrt(covariance[0, 0])) * to_meV_per_atom,
        "etot_rms_about_fit_meV_per_atom": float(np.sqrt(np.mean(residual**2))) * to_meV_per_atom,
        "etot_range_meV_per_atom": float(np.ptp(etot)) * to_meV_per_atom,
        "mean_temperature_K": float(columns["temperature_K"].mean()),
        "log": {"time_ps": time_ps.tolist(), "etot_eV": etot.tolist(), "temperature_K": columns["temperature_K"].tolist()},
    }


def print_table(results: dict) -> None:
    system = results["system"]
    print(f"\n{results['environment']['device']}: {system['n_atoms']} atoms, {system['n_edges']} edges, "
          f"box {system['box_A']:.2f} Å; start: {system['start']}")
    print(f"{'skin Å':>7s} {'graph':>6s} {'steps':>6s} {'ms/step':>8s} {'steps/s':>8s} {'ns/day':>7s} {'searches':>9s} {'T K':>6s}")
    for row in results["nvt_speed"]:
        print(f"{row['skin_A']:7.2f} {str(row['cuda_graph']):>6s} {row['steps']:6d} {row['ms_per_step']:8.2f} {row['steps_per_s']:8.2f} "
              f"{row['ns_per_day']:7.3f} {row['neighbour_searches']:9d} {row['final_temperature_K']:6.0f}")
    parts = results["breakdown"]
    print(f"per call: graph {parts['graph_ms']:.2f} ms, model forward+backward "
          f"{parts['model_forward_backward_ms']:.2f} ms, calculator {parts['calculator_call_ms']:.2f} ms")
    nve = results["nve"]
    print(f"NVE {nve['ps']:.3g} ps (skin {nve['skin_A']} Å, CUDA graph {nve['cuda_graph']}): drift {nve['drift_meV_per_atom_ps']:+.4f} "
          f"± {nve['drift_standard_error_meV_per_atom_ps']:.4f} meV/atom/ps, Etot RMS about the fit "
          f"{nve['etot_rms_about_fit_meV_per_atom']:.4f} meV/atom, mean T {nve['mean_temperature_K']:.0f} K")
    if "profile" in parts:
        print(parts["profile"])


if __name__ == "__main__":
    main()
