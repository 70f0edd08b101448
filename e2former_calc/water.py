"""Periodic boxes of liquid water to start simulations and sampling from.

`build_water_box` places rigid molecules with random, clash-free orientations on a cubic lattice
at the requested density.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

WATER_MASS_AMU = 18.01528
AVOGADRO = 6.02214076e23
OH_BOND_ANGSTROM = 0.9572
HOH_ANGLE_DEGREES = 104.52


def water_molecule() -> np.ndarray:
    """Positions [3, 3] (Å) of one water molecule, O first, centred on the oxygen."""
    half_angle = np.deg2rad(HOH_ANGLE_DEGREES) / 2
    return np.array(
        [
            [0.0, 0.0, 0.0],
            [OH_BOND_ANGSTROM * np.sin(half_angle), 0.0, OH_BOND_ANGSTROM * np.cos(half_angle)],
            [-OH_BOND_ANGSTROM * np.sin(half_angle), 0.0, OH_BOND_ANGSTROM * np.cos(half_angle)],
        ]
    )


def box_length(n_molecules: int, density_g_cm3: float) -> float:
    """Edge (Å) of the cubic cell that holds `n_molecules` waters at `density_g_cm3`."""
    volume_cm3 = n_molecules * WATER_MASS_AMU / AVOGADRO / density_g_cm3
    return (volume_cm3 * 1e24) ** (1.0 / 3.0)


def build_water_box(
    n_molecules: int,
    density_g_cm3: float = 0.997,
    seed: int = 0,
    min_contact: float = 1.7,
) -> Atoms:
    """A cubic periodic box of `n_molecules` waters (atoms ordered O, H, H per molecule).

    Molecules sit on the smallest cubic lattice that holds them, with a small random jitter and
    random orientations, redrawn until no atom is closer than `min_contact` Å (minimum image) to
    an atom of another molecule, so MD can start without a relaxation. Raises ValueError for a
    non-positive count or density, or when no clash-free orientation is found.
    """
    if n_molecules < 1:
        raise ValueError(f"n_molecules must be at least 1, got {n_molecules}")
    if not density_g_cm3 > 0:
        raise ValueError(f"density must be positive, got {density_g_cm3} g/cm^3")
    rng = np.random.default_rng(seed)
    length = box_length(n_molecules, density_g_cm3)
    per_side = int(np.ceil(n_molecules ** (1.0 / 3.0)))
    spacing = length / per_side
    sites = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = sites[rng.permutation(len(sites))[:n_molecules]]
    molecule = water_molecule()
    placed = np.zeros((0, 3))
    for site in sites:
        for _attempt in range(1000):
            centre = (site + 0.5) * spacing + rng.normal(scale=0.05 * spacing, size=3)
            candidate = molecule @ _random_rotation(rng).T + centre
            separation = candidate[:, None, :] - placed[None, :, :]
            separation -= length * np.round(separation / length)
            if len(placed) == 0 or np.linalg.norm(separation, axis=-1).min() >= min_contact:
                break
        else:
            raise ValueError(
                f"could not place {n_molecules} waters at {density_g_cm3} g/cm^3 with contacts "
                f">= {min_contact} Å; lower the density or min_contact"
            )
        placed = np.concatenate([placed, candidate])
    atoms = Atoms("OH2" * n_molecules, positions=placed, cell=[length] * 3, pbc=True)
    atoms.wrap()
    return atoms


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3×3 rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
