"""Float32 energy error far from the origin, per value path (issue: network, "Translation").

Evaluates one random-weight model on a molecule cluster and on copies shifted by 0, 10, 100 and
1000 Å, in float32, against the float64 energy at the origin. The shift is applied to the graph's
float32 positions directly (build_graph itself centres each system, which would hide it). Path B (moments) only sees edge
vectors; path A (EAAS) uses absolute positions, with and without per-system centring.

    python -m benchmarks.translation_precision --out translation.json
"""

from __future__ import annotations

import argparse
import json

import torch
from ase.build import molecule

from benchmarks.common import environment
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
from e2former_calc.neighbors import build_graph


def cluster():
    atoms = molecule("CH3CH2OH")
    for offset in ([3.0, 0.5, 0.0], [-2.5, 2.0, 1.0], [0.5, -3.0, 1.5]):
        water = molecule("H2O")
        water.translate(offset)
        atoms += water
    return atoms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--out", default="translation.json")
    args = parser.parse_args()
    base = dict(species=(1, 6, 8), channels=32, num_blocks=2, num_heads=8, cutoff=5.0)
    variants = {
        "B moments": dict(value_path="moments"),
        "A eaas, centred": dict(value_path="eaas", center_eaas=True),
        "A eaas, not centred": dict(value_path="eaas", center_eaas=False),
    }
    atoms = cluster()
    rows = []
    torch.manual_seed(0)
    weights = E2FormerV2(E2FormerConfig(**base)).state_dict()
    for name, overrides in variants.items():
        model = E2FormerV2(E2FormerConfig(**base, **overrides))
        model.load_state_dict(weights)
        reference = model.double()(build_graph([atoms], 5.0, dtype=torch.float64), compute_forces=False)["energy"].item()
        model.float()
        graph64 = build_graph([atoms], 5.0, dtype=torch.float64)
        for shift in args.shifts:
            graph = graph64.to(dtype=torch.float32)
            graph.positions = (graph64.positions + torch.tensor([shift, -shift, shift], dtype=torch.float64)).float()
            energy = model(graph, compute_forces=False)["energy"].item()
            rows.append({"path": name, "shift_angstrom": shift, "relative_error": abs(energy - reference) / abs(reference)})
            print(f"{name:22s} shift {shift:7.0f} Å  |ΔE|/|E| = {rows[-1]['relative_error']:.2e}")
    with open(args.out, "w") as handle:
        json.dump({"environment": environment(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
