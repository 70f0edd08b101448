"""What TF32 matrix products would cost the shipped water model in accuracy.

TF32 tensor cores keep 10 of float32's 23 mantissa bits of each factor of a matrix product and
accumulate in float32. On a GPU, `--device cuda` turns them on for the step
(torch.backends.cuda.matmul.allow_tf32); on the CPU the same rounding is emulated: every factor of
mm, bmm and addmm (biases excepted) is rounded to the nearest TF32 value (ties away from zero, as
the hardware's conversion does) before the float32 product, either in every product (what
allow_tf32 does) or only where the inner dimension is at least 16: the network's linears, the small
products of irrep algebra left in float32. (The geometric products, cell shifts and strain, are
elementwise sums since they were found here to dominate the error: models/graph.py.) Each
configuration's energy, forces and stress are compared with the float32 model's.

    python -m benchmarks.tf32_accuracy --out tf32_accuracy.json                 # CPU, emulated (both variants)
    python -m benchmarks.tf32_accuracy --device cuda --out tf32_accuracy.json   # real TF32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.io import read
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_throughput import tf32_matmuls
from benchmarks.common import environment
from e2former_calc import E2FormerCalculator

START = Path(__file__).resolve().parent / "nve_start_216w.extxyz"  # 216 waters from an NVT run of the shipped model
MATRIX_FACTORS = {  # operator -> positions of its matrix factors
    torch.ops.aten.mm.default: (0, 1),
    torch.ops.aten.bmm.default: (0, 1),
    torch.ops.aten.addmm.default: (1, 2),
}


def round_to_tf32(values: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32's 10-bit mantissa (nearest, ties away from zero), still float32."""
    bits = values.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)  # add half of the 13 dropped bits' unit, then drop them


class EmulatedTF32(TorchDispatchMode):
    """Rounds to TF32 the float32 factors of every matrix product inside it whose inner dimension
    is at least `min_inner`."""

    def __init__(self, min_inner: int = 1):
        super().__init__()
        self.min_inner = min_inner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        positions = MATRIX_FACTORS.get(func)
        first = args[positions[0]] if positions is not None else None
        if first is not None and first.dtype == torch.float32 and first.shape[-1] >= self.min_inner:
            args = tuple(round_to_tf32(a) if i in positions else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


def compare(atoms, calculator, tf32) -> dict:
    """Energy (meV/atom), force (meV/Å) and stress (MPa) differences on one configuration between
    the calculator's results inside the context `tf32()` and outside it."""
    atoms = atoms.copy()
    atoms.calc = calculator
    calculator.reset()
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    calculator.reset()
    with tf32():
        energy_tf32, forces_tf32, stress_tf32 = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    difference = np.abs(forces_tf32 - forces) * 1e3
    return {"num_atoms": len(atoms), "energy_meV_per_atom": abs(energy_tf32 - energy) * 1e3 / len(atoms),
            "force_max_meV_per_A": float(difference.max()), "force_mae_meV_per_A": float(difference.mean()),
            "force_rms_meV_per_A": float(np.sqrt(np.mean(difference**2))),
            "force_scale_rms_meV_per_A": float(np.sqrt(np.mean(forces**2)) * 1e3),
            "stress_max_MPa": float(np.abs(stress_tf32 - stress).max() / units.GPa * 1e3),
            "stress_scale_max_MPa": float(np.abs(stress).max() / units.GPa * 1e3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e2former-v2-water-s")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", default=str(START), help="extxyz of the configurations to compare")
    parser.add_argument("--out", type=Path, default=Path("tf32_accuracy.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    calculator = E2FormerCalculator(model=args.model, device=device)
    if device.type == "cuda":
        variants = {"every product (hardware, allow_tf32)": tf32_matmuls}
    else:
        variants = {"every product (emulated)": EmulatedTF32,
                    "inner dimension >= 16 (emulated; small products in float32)": lambda: EmulatedTF32(min_inner=16)}
    rows = [{"variant": name, **compare(atoms, calculator, tf32)}
            for atoms in read(args.frames, index=":") for name, tf32 in variants.items()]
    for row in rows:
        print(f"{row['variant']:55s} {row['num_atoms']:6d} atoms: |ΔE| {row['energy_meV_per_atom']:.4f} meV/atom, |ΔF| max "
              f"{row['force_max_meV_per_A']:.3f}, mean {row['force_mae_meV_per_A']:.4f}, rms {row['force_rms_meV_per_A']:.4f} "
              f"meV/Å (rms |F| {row['force_scale_rms_meV_per_A']:.0f}); |Δσ| max {row['stress_max_MPa']:.2f} MPa "
              f"(max |σ| {row['stress_scale_max_MPa']:.0f})")
    result = {"what": "TF32 against float32 matrix products, shipped water model (benchmarks/tf32_accuracy.py)",
              "model": args.model, "frames": args.frames, "environment": environment(), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
