"""NVT liquid water with the shipped E2Former-V2 model, then g_OO(r) against experiment.

    python examples/water_nvt.py --quick            # 64 waters, 0.2 ps, minutes on a CPU (the README's main job)
    python examples/water_nvt.py --full --device cuda   # the paper's system: 216 waters, 10 ps + 50 ps

Writes to --output (default runs/water_nvt_quick or runs/water_nvt_full):
  equilibration/ and production/  trajectories, logs and restart files (re-running resumes),
  rdf.csv, rdf_metrics.json, rdf.png   g_OO(r) of the production run vs Skinner et al. 2013,
  run.json                         settings, model, device, timings and MD speed (ns/day).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ase.io import iread

from e2former_calc import E2FormerCalculator
from e2former_calc.md import run_md
from e2former_calc.rdf import compare_with_experiment, compute_rdf, load_experimental_rdf, plot_rdf, write_rdf_csv
from e2former_calc.water import build_water_box

MODES = {
    # waters, equilibration ps, production ps, trajectory interval (steps)
    # quick: a CPU demonstration (~400 steps); far too short for converged structure, see the README
    "quick": dict(n_waters=64, equilibration_ps=0.05, production_ps=0.15, trajectory_interval=10),
    "full": dict(n_waters=216, equilibration_ps=10.0, production_ps=50.0, trajectory_interval=100),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_const", dest="mode", const="quick")
    size.add_argument("--full", action="store_const", dest="mode", const="full")
    parser.add_argument("--model", default="e2former-v2-water-s", help="shipped model name or checkpoint path")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ensemble", default="nose-hoover", help="nose-hoover, bussi or langevin")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    settings = MODES[args.mode]
    output = args.output or Path("runs") / f"water_nvt_{args.mode}"

    atoms = build_water_box(settings["n_waters"], seed=args.seed)
    atoms.calc = E2FormerCalculator(model=args.model, device=args.device)
    steps_per_ps = round(1000 / args.timestep)
    timings = {}
    for stage, picoseconds in (("equilibration", settings["equilibration_ps"]), ("production", settings["production_ps"])):
        start = time.perf_counter()
        result = run_md(
            atoms, args.ensemble, args.temperature, args.timestep, round(picoseconds * steps_per_ps),
            output / stage, seed=args.seed, trajectory_interval=settings["trajectory_interval"],
            log_interval=settings["trajectory_interval"],
        )
        steps_run = result.steps - result.started_from_step
        timings[stage] = {"seconds": time.perf_counter() - start, "steps": steps_run}
        print(f"{stage}: {steps_run} steps in {timings[stage]['seconds']:.0f} s, final T = {result.final_temperature_K:.0f} K")

    rdf = compute_rdf(iread(output / "production" / "trajectory.extxyz"), pair=("O", "O"), progress=True)
    experiment = load_experimental_rdf("skinner2013")
    metrics = compare_with_experiment(rdf, experiment)
    write_rdf_csv(output / "rdf.csv", rdf)
    plot_rdf(output / "rdf.png", rdf, experiment, label=f"E2Former-V2 ({args.model}), {args.temperature:.0f} K")
    (output / "rdf_metrics.json").write_text(json.dumps(metrics, indent=1))

    production = timings["production"]
    ns_per_day = (production["steps"] * args.timestep * 1e-6) / (production["seconds"] / 86400) if production["steps"] else None
    run = {
        "mode": args.mode, "n_waters": settings["n_waters"], "n_atoms": len(atoms), "model": args.model,
        "device": str(atoms.calc.device), "ensemble": args.ensemble, "temperature_K": args.temperature,
        "timestep_fs": args.timestep, "seed": args.seed, "timings": timings, "ns_per_day": ns_per_day,
    }
    (output / "run.json").write_text(json.dumps(run, indent=1))
    print(json.dumps(metrics, indent=1))
    print(f"wrote {output}/rdf.png, rdf.csv, rdf_metrics.json, run.json")


if __name__ == "__main__":
    main()
