"""Inference throughput and peak memory versus system size (paper Table 3 / appendix D protocol).

FCC carbon (lattice constant 3.8 Å), N atoms sampled from a supercell, cutoff 6 Å, no periodic
boundaries; for each N: build the neighbour list (timed separately, GPU and CPU), then 10
warm-up and 10 timed model steps, reporting steps/s and torch.cuda.max_memory_allocated (reset
per case). Out-of-memory is recorded as "OOM", never a crash. Models: ours (paper size and the
water preset, random weights) in conservative and direct mode.

    python benchmarks/bench_throughput.py --sizes 1000 10000 100000 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from ase.build import bulk

from benchmarks.common import environment, time_cuda
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
from e2former_calc.neighbors import build_graph


def fcc_carbon(num_atoms: int, seed: int = 0):
    """`num_atoms` atoms picked at random from a cubic FCC carbon supercell (a = 3.8 Å), pbc off."""
    unit = bulk("C", "fcc", a=3.8, cubic=True)
    repeat = int(np.ceil((num_atoms / len(unit)) ** (1 / 3))) + 1
    crystal = unit * (repeat, repeat, repeat)
    rng = np.random.default_rng(seed)
    # Take a compact block: the atoms nearest the centre, so the density (and neighbour count) is bulk-like.
    centre = crystal.positions.mean(axis=0)
    order = np.argsort(np.linalg.norm(crystal.positions - centre, axis=1) + rng.uniform(0, 1e-3, len(crystal)))
    atoms = crystal[np.sort(order[:num_atoms])]
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    return atoms


def model_configs():
    return {
        "paper_L2_C256_4x128": E2FormerConfig(species=(1, 6, 7, 8), cutoff=6.0),
        "water_small_preset": E2FormerConfig(**{**E2FormerConfig.water_small().to_dict(), "species": [1, 6, 8], "cutoff": 6.0}),
    }


def measure(model, graph, mode, warmup, repeats):
    def step():
        out = model(graph, compute_forces=True, mode=mode)
        return out["energy"]

    if mode == "direct":
        with torch.no_grad():
            seconds = time_cuda(step, warmup, repeats)
    else:
        seconds = time_cuda(step, warmup, repeats)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000, 100000, 300000, 1000000])
    parser.add_argument("--models", nargs="+", default=list(model_configs()))
    parser.add_argument("--modes", nargs="+", default=["direct", "conservative"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="throughput.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"environment": environment(), "protocol": vars(args), "rows": []}
    print(f"{'model':24s} {'mode':12s} {'N':>8s} {'edges':>10s} {'steps/s':>9s} {'GB':>7s} {'B/atom':>9s}")
    for name in args.models:
        config = model_configs()[name]
        torch.manual_seed(0)
        model = E2FormerV2(config).to(device)
        for num_atoms in args.sizes:
            atoms = fcc_carbon(num_atoms)
            start = time.perf_counter()
            graph = build_graph([atoms], config.cutoff, device=device)
            neighbor_seconds = time.perf_counter() - start
            for mode in args.modes:
                row = {"model": name, "mode": mode, "num_atoms": num_atoms, "num_edges": graph.num_edges,
                       "neighbor_list_cpu_s": neighbor_seconds}
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    seconds = measure(model, graph, mode, args.warmup, args.repeats)
                    row["steps_per_s"] = 1.0 / seconds
                    if device.type == "cuda":
                        peak = torch.cuda.max_memory_allocated()
                        row["peak_gb"] = peak / 1e9
                        row["bytes_per_atom"] = peak / num_atoms
                except torch.OutOfMemoryError:
                    row["steps_per_s"] = "OOM"
                results["rows"].append(row)
                print(f"{name:24s} {mode:12s} {num_atoms:8d} {graph.num_edges:10d} "
                      f"{row['steps_per_s'] if row['steps_per_s'] == 'OOM' else f'{row['steps_per_s']:9.2f}':>9s} "
                      f"{row.get('peak_gb', float('nan')):7.2f} {row.get('bytes_per_atom', float('nan')):9.0f}", flush=True)
            del graph
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
