"""Reference DFT labels for water configurations: revPBE-D3(BJ)/def2-TZVP with PySCF.

`label_atoms` runs one closed-shell, density-fitted Kohn–Sham calculation on a finite cluster
and returns the energy (eV) and forces (eV/Å) with the D3(BJ) two-body dispersion included in
both. The level of theory is fixed here so every frame of the dataset shares it; `METHOD` is
the string recorded with each frame. PySCF (and, for `device="gpu"`, gpu4pyscf) is imported
lazily: only the dataset pipeline needs it, never the calculator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.units import Bohr, Hartree

XC = "revpbe"
DISPERSION = "d3bj"
BASIS = "def2-tzvp"
AUXBASIS = "def2-universal-jkfit"
METHOD = "revPBE-D3(BJ)/def2-TZVP DF(def2-universal-jkfit) PySCF-default-grids RKS"


SECOND_ORDER_MAX_CYCLE = 30  # Newton (SOSCF) cycles tried after the DIIS cycles failed


class SCFNotConverged(RuntimeError):
    """The SCF did not reach PySCF's convergence criteria; the frame has no valid label."""


@dataclass
class DFTLabel:
    """One labelled configuration.

    energy: total energy (eV), dispersion included; forces: [n_atoms, 3] (eV/Å);
    dispersion_energy: the D3(BJ) part of `energy` (eV); wall_seconds: time of SCF + gradient;
    scf_cycles: SCF iterations used; device: "cpu" or "gpu".
    """

    energy: float
    forces: np.ndarray
    dispersion_energy: float
    method: str
    wall_seconds: float
    scf_cycles: int
    device: str


def build_molecule(atoms: Atoms, basis: str = BASIS, charge: int = 0, spin_multiplicity: int = 1, ghost=None):
    """A PySCF `Mole` of the (non-periodic) `atoms`, positions in Å. Atoms where the boolean mask
    `ghost` [n_atoms] is true carry their basis functions but no nucleus or electrons (counterpoise)."""
    from pyscf import gto

    symbols = [("ghost-" if is_ghost else "") + symbol
               for symbol, is_ghost in zip(atoms.get_chemical_symbols(), np.zeros(len(atoms), bool) if ghost is None else ghost)]
    return gto.M(
        atom=[(symbol, tuple(position)) for symbol, position in zip(symbols, atoms.positions)],
        unit="Angstrom",
        basis=basis,
        charge=charge,
        spin=spin_multiplicity - 1,  # PySCF's `spin` is 2S
        verbose=0,
        max_memory=6000,  # MB; larger density-fitting tensors go to a scratch file
    )


def build_scf(atoms: Atoms, basis: str = BASIS, auxbasis: str | None = AUXBASIS, device: str = "cpu"):
    """The density-fitted, dispersion-corrected RKS object for `atoms` (not yet run).

    `device="gpu"` moves it to gpu4pyscf (same functional, basis, fitting basis and grids).
    """
    molecule = build_molecule(atoms, basis)
    scf = molecule.RKS(xc=XC).density_fit(auxbasis=auxbasis)
    scf.disp = DISPERSION
    if device == "gpu":
        scf = scf.to_gpu()  # needs gpu4pyscf; raises ImportError without it
    elif device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    return scf


def label_atoms(atoms: Atoms, basis: str = BASIS, auxbasis: str | None = AUXBASIS, device: str = "cpu") -> DFTLabel:
    """Energy and forces of the closed-shell, neutral cluster `atoms`.

    Raises SCFNotConverged when the SCF does not converge. `basis`/`auxbasis` other than the
    defaults exist only for cheap plumbing tests; the recorded method then names them.
    """
    if atoms.pbc.any():
        raise ValueError("label_atoms takes finite clusters; got a periodic cell")
    start = time.perf_counter()
    scf = build_scf(atoms, basis, auxbasis, device)
    cycles = _SCFCycleCounter()
    scf.callback = cycles
    energy_hartree = float(scf.kernel())
    if not scf.converged:  # DIIS fails on some strongly distorted clusters: second-order SCF from where it stopped
        scf = scf.newton()
        scf.max_cycle = SECOND_ORDER_MAX_CYCLE
        energy_hartree = float(scf.kernel(scf.make_rdm1()))
    if not scf.converged:
        raise SCFNotConverged(f"SCF not converged after {cycles.count} cycles (DIIS, then second order)")
    gradient = np.asarray(_to_numpy(scf.nuc_grad_method().kernel()))  # Hartree/Bohr, dispersion included
    method = METHOD if (basis, auxbasis) == (BASIS, AUXBASIS) else METHOD.replace("def2-TZVP", basis).replace(
        "def2-universal-jkfit", str(auxbasis)
    )
    return DFTLabel(
        energy=energy_hartree * Hartree,
        forces=-gradient * Hartree / Bohr,
        dispersion_energy=float(scf.scf_summary.get("dispersion", 0.0)) * Hartree,
        method=method,
        wall_seconds=time.perf_counter() - start,
        scf_cycles=cycles.count,
        device=device,
    )


class _SCFCycleCounter:
    """SCF callback that counts iterations (PySCF calls it once per cycle)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, _envs: dict) -> None:
        self.count += 1


def _to_numpy(array):
    """gpu4pyscf returns CuPy arrays; bring them to the host."""
    return array.get() if hasattr(array, "get") else array
