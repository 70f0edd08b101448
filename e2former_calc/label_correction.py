"""Pairwise corrections to DFT labels, applied to the frames before training.

The water labels (revPBE-D3(BJ)/def2-TZVP) overbind close water pairs by a basis-set superposition
error (BSSE): against counterpoise-corrected def2-QZVP, 52 meV at O–O 2.6–2.8 Å, fading to 2 meV
by 5.5–6.6 Å (benchmarks/label_bsse.py, benchmarks/results/label_bsse_cpu.json), and the error of a
cluster is 0.94–1.03x the sum over its pairs. So a repulsive pair term between oxygens, fitted to
the dimer overbinding, moves every label toward the reference:

    E_corrected = E_label + Σ_{O–O pairs, r < cutoff} φ(r)
    φ(r) = A exp(-b (r - r0)) s(r)

with s a C² switch (the quintic smoothstep) from 1 at `switch_on_A` to 0 at `cutoff_A`, so that
the corrected energy stays smooth. Forces get -∇ of the same sum, exactly. Each oxygen belongs to
one molecule, so O–O pairs are the intermolecular pairs of water, ions included.

    correction = PairCorrection(amplitude_eV=0.0396, decay_per_A=0.752)
    energy_eV, forces_eV_per_A = correction.energy_and_forces(atoms)
    frames = correct_labels(frames, correction)              # new frames; the input is untouched

    python -m e2former_calc.label_correction benchmarks/results/label_bsse_cpu.json   # refit, with
                                                                                      # leave-one-out errors
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from scipy.optimize import least_squares
from vesin import NeighborList

from e2former_calc.dataset import frame_labels


@dataclass(frozen=True)
class PairCorrection:
    """φ(r) = amplitude exp(-decay (r - reference_distance)) s(r) between every pair of `elements`."""

    amplitude_eV: float
    decay_per_A: float
    reference_distance_A: float = 3.0
    switch_on_A: float = 5.0
    cutoff_A: float = 6.5
    elements: tuple[str, str] = ("O", "O")

    def __post_init__(self):
        if not 0 < self.switch_on_A < self.cutoff_A:
            raise ValueError(f"need 0 < switch_on_A < cutoff_A, got {self.switch_on_A} and {self.cutoff_A}")
        if len(self.elements) != 2:
            raise ValueError(f"elements must name two elements, got {self.elements!r}")
        object.__setattr__(self, "elements", tuple(self.elements))

    @classmethod
    def from_dict(cls, raw: dict) -> "PairCorrection":
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown keys in the label correction: {sorted(unknown)}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return {**asdict(self), "elements": list(self.elements)}

    def pair_energy(self, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """φ(r) (eV) and dφ/dr (eV/Å) at the distances `distance` (Å), any shape."""
        span = self.cutoff_A - self.switch_on_A
        x = np.clip((distance - self.switch_on_A) / span, 0.0, 1.0)
        switch = (1 - x) ** 3 * (1 + 3 * x + 6 * x**2)  # 1 - 10x^3 + 15x^4 - 6x^5, factored
        switch_slope = -30 * x**2 * (1 - x) ** 2 / span
        exponential = self.amplitude_eV * np.exp(-self.decay_per_A * (distance - self.reference_distance_A))
        return exponential * switch, exponential * (switch_slope - self.decay_per_A * switch)

    def energy_and_forces(self, atoms: Atoms) -> tuple[float, np.ndarray]:
        """The correction's energy (eV) and forces [n_atoms, 3] (eV/Å) for `atoms`, periodic images included."""
        symbols = np.array(atoms.get_chemical_symbols())
        first, second, distance, vector = NeighborList(cutoff=self.cutoff_A, full_list=False).compute(
            points=atoms.get_positions(), box=atoms.cell.array, periodic=atoms.pbc.tolist(), quantities="ijdD"
        )
        a, b = self.elements
        keep = ((symbols[first] == a) & (symbols[second] == b)) | ((symbols[first] == b) & (symbols[second] == a))
        first, second, distance, vector = first[keep], second[keep], distance[keep], vector[keep]
        energy, slope = self.pair_energy(distance)
        # vector = r_second - r_first: dE/dr_second = φ'(r) vector / r, and the opposite for first
        pull = (slope / distance)[:, None] * vector
        forces = np.zeros((len(atoms), 3))
        np.add.at(forces, first, pull)
        np.add.at(forces, second, -pull)
        return float(energy.sum()), forces


def correct_labels(frames: list[Atoms], correction: PairCorrection) -> list[Atoms]:
    """Copies of `frames` with the correction added to their energy and forces labels.

    Each copy records the correction's energy in `info["label_correction_eV"]`. Frames with stress
    labels are refused: the correction has no virial here, and a half-corrected label would be worse.
    """
    corrected = []
    for atoms in frames:
        if (atoms.calc is not None and "stress" in atoms.calc.results) or "stress" in atoms.info:
            raise ValueError("label correction of frames with stress labels is not supported")
        energy, forces = frame_labels(atoms)
        delta_energy, delta_forces = correction.energy_and_forces(atoms)
        copy = atoms.copy()
        copy.info["label_correction_eV"] = delta_energy
        copy.calc = SinglePointCalculator(copy, energy=energy + delta_energy, forces=forces + delta_forces)
        corrected.append(copy)
    return corrected


def fit_dimer_correction(distance_A: np.ndarray, overbinding_eV: np.ndarray, **fixed) -> tuple[PairCorrection, dict]:
    """Least-squares amplitude and decay of a PairCorrection to dimer overbinding (reference - label, eV)
    against O–O distance (Å); `fixed` sets the other fields. Returns the fit and its errors (meV): the
    RMSE of the fit and the leave-one-out RMSE, overall and for dimers closer than 4.5 Å."""

    def fitted(rows: np.ndarray, start=(0.04, 0.7)) -> PairCorrection:
        def residual(parameters):
            trial = PairCorrection(*parameters, **fixed)
            return trial.pair_energy(distance_A[rows])[0] - overbinding_eV[rows]

        return PairCorrection(*least_squares(residual, start).x, **fixed)

    everything = np.arange(len(distance_A))
    correction = fitted(everything)
    held_out = np.array([
        fitted(everything[everything != k], (correction.amplitude_eV, correction.decay_per_A)).pair_energy(distance_A[k])[0]
        - overbinding_eV[k]
        for k in everything
    ])
    fit_error = correction.pair_energy(distance_A)[0] - overbinding_eV
    close = distance_A < 4.5
    stats = {
        "n_dimers": len(distance_A),
        "rmse_meV": 1e3 * float(np.sqrt(np.mean(fit_error**2))),
        "loo_rmse_meV": 1e3 * float(np.sqrt(np.mean(held_out**2))),
        "loo_rmse_below_4p5_A_meV": 1e3 * float(np.sqrt(np.mean(held_out[close] ** 2))),
        "overbinding_std_below_4p5_A_meV": 1e3 * float(np.std(overbinding_eV[close])),
    }
    return correction, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fit the O–O label correction to measured dimer overbinding.")
    parser.add_argument("bsse_json", help="results of benchmarks/label_bsse.py (its 'dimers' rows)")
    args = parser.parse_args(argv)
    dimers = json.loads(open(args.bsse_json).read())["dimers"]
    distance = np.array([row["oo_distance_A"] for row in dimers])
    overbinding = 1e-3 * np.array([row["label_overbinding_meV"] for row in dimers])
    correction, stats = fit_dimer_correction(distance, overbinding)
    print(json.dumps({"label_correction": correction.to_dict(), "fit": stats}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
