"""Tiny labelled water clusters for the training tests: EMT energies and forces (consistent, cheap)."""

import numpy as np
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator


def water_cluster(n_waters: int, rng: np.random.Generator):
    """n_waters randomly rotated, slightly distorted waters about 2.9 Å apart, labelled with EMT."""
    atoms = molecule("H2O")[:0]
    for k in range(n_waters):
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), rng.normal(size=3))
        water.positions += rng.normal(scale=0.05, size=(3, 3)) + [2.9 * k, rng.normal(scale=0.3), 0]
        atoms += water
    atoms.calc = EMT()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms
