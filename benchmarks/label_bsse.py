"""Basis-set superposition error of the training labels: water-dimer interaction energies.

The labels are revPBE-D3(BJ)/def2-TZVP on finite clusters (e2former_calc.dft). With a finite Gaussian
basis each molecule borrows its neighbours' functions, which lowers the energy of close contacts
(BSSE) and so overbinds hydrogen bonds. This script measures by how much, on the dimers of the
dataset closer than --max-oo, against counterpoise-corrected (CP) def2-QZVP, near the basis-set limit:

    python -m benchmarks.label_bsse --max-oo 4.5 --out benchmarks/results/label_bsse_cpu.json

Interaction energy E(AB) - E(A) - E(B) of the DFT part (the D3(BJ) term does not depend on the basis
and is reported beside it), in meV; CP evaluates each monomer in the dimer's basis (the partner's atoms
as ghosts). Overbinding = CP def2-QZVP minus the labels' raw def2-TZVP: positive when the labels bind
too strongly. The output is rewritten after every dimer, and dimers already in it are skipped, so an
interrupted run resumes where it stopped (about two minutes per dimer on two CPU cores).

Is the error pairwise additive (could a correction fitted on dimers be summed over a cluster's pairs)?
`--clusters N --cluster-waters K` takes the K waters nearest the centre of N liquid clusters and compares
the basis effect on their interaction energy, raw def2-TZVP minus raw def2-QZVP (no ghost atoms, so
nothing depends on how a counterpoise is defined for more than two molecules), with the sum of the same
quantity over their K(K-1)/2 pairs, each as an isolated dimer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase.units import Hartree
from tqdm import tqdm

from e2former_calc import dft
from e2former_calc.dataset import load_frames

BASES = ("def2-tzvp", "def2-qzvp")
DISTANCE_BINS_A = ((2.3, 2.6), (2.6, 2.8), (2.8, 3.0), (3.0, 3.3), (3.3, 3.6), (3.6, 4.0), (4.0, 4.5), (4.5, 5.0), (5.0, 5.5), (5.5, 6.6))


def scf_energy(atoms, basis: str, ghost=None) -> float:
    """Density-fitted revPBE energy (eV, no dispersion) of `atoms`, the masked atoms as ghosts."""
    molecule = dft.build_molecule(atoms, basis, ghost=ghost)
    scf = molecule.RKS(xc=dft.XC).density_fit(auxbasis=dft.AUXBASIS)
    energy = float(scf.kernel())
    if not scf.converged:
        raise dft.SCFNotConverged(f"{basis}: SCF not converged")
    return energy * Hartree


def interaction_energies(dimer, basis: str) -> dict:
    """Raw and counterpoise-corrected interaction energies (meV) of a water dimer (atoms 0-2, 3-5)."""
    first = np.arange(len(dimer)) < 3
    total = scf_energy(dimer, basis)
    own_basis = scf_energy(dimer[first], basis) + scf_energy(dimer[~first], basis)
    dimer_basis = scf_energy(dimer, basis, ghost=~first) + scf_energy(dimer, basis, ghost=first)
    return {"raw_meV": 1000 * (total - own_basis), "counterpoise_meV": 1000 * (total - dimer_basis)}


def molecules(atoms) -> list:
    """The water molecules of `atoms` (O, H, H per molecule), as separate Atoms."""
    return [atoms[3 * k: 3 * k + 3] for k in range(len(atoms) // 3)]


def cluster_row(cluster) -> dict:
    """Basis effect on a cluster's interaction energy and the sum of it over the cluster's pairs.

    The basis effect of a set of waters is their raw interaction energy (energy of the set minus its
    molecules', each in its own basis) in def2-TZVP minus in def2-QZVP, in meV: negative when TZVP binds more.
    """
    waters = molecules(cluster)
    molecule_energy = [{basis: scf_energy(water, basis) for basis in BASES} for water in waters]  # reused by every pair

    def basis_effect(members: list[int]) -> float:
        atoms = sum((waters[k] for k in members[1:]), waters[members[0]])
        tzvp, qzvp = (scf_energy(atoms, basis) - sum(molecule_energy[k][basis] for k in members) for basis in BASES)
        return 1000 * (tzvp - qzvp)

    pair_effects = [basis_effect([i, j]) for i in range(len(waters)) for j in range(i + 1, len(waters))]
    row = {"frame_id": cluster.info["frame_id"], "waters": len(waters),
           "cluster_meV": basis_effect(list(range(len(waters)))), "sum_of_pairs_meV": float(sum(pair_effects)), "pairs_meV": pair_effects}
    row["cluster_over_pairs"] = row["cluster_meV"] / row["sum_of_pairs_meV"]
    return row


def dispersion_interaction(dimer) -> float:
    """D3(BJ) interaction energy (meV) of a water dimer (atoms 0-2, 3-5), as included in the labels."""
    def dispersion(atoms):
        return float(dft.build_scf(atoms).get_dispersion()) * Hartree

    return 1000 * (dispersion(dimer) - dispersion(dimer[:3]) - dispersion(dimer[3:]))


def dimer_row(dimer) -> dict:
    """Interaction energies of one dimer in both bases, the labels' and the reference's totals."""
    row = {"frame_id": dimer.info["frame_id"], "oo_distance_A": float(dimer.get_distance(0, 3)),
           "d3bj_meV": dispersion_interaction(dimer)}
    for basis in BASES:
        row[basis] = interaction_energies(dimer, basis)
    row["label_meV"] = row["def2-tzvp"]["raw_meV"] + row["d3bj_meV"]
    row["reference_meV"] = row["def2-qzvp"]["counterpoise_meV"] + row["d3bj_meV"]
    row["label_overbinding_meV"] = row["reference_meV"] - row["label_meV"]
    return row


def overbinding_by_distance(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation and count of the overbinding (meV) in O-O distance bins of DISTANCE_BINS_A."""
    summary = []
    for low, high in DISTANCE_BINS_A:
        values = [row["label_overbinding_meV"] for row in rows if low <= row["oo_distance_A"] < high]
        if values:
            summary.append({"oo_from_A": low, "oo_to_A": high, "dimers": len(values),
                            "mean_meV": float(np.mean(values)), "std_meV": float(np.std(values))})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-oo", type=float, default=4.5, help="dimers with an O-O distance below this (Å)")
    parser.add_argument("--clusters", type=int, default=0, help="also test additivity on this many liquid clusters")
    parser.add_argument("--cluster-waters", type=int, default=3, help="waters kept per cluster (the nearest the centre)")
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()

    record = json.loads(arguments.out.read_text()) if arguments.out.exists() else {
        "what": __doc__.splitlines()[0], "method": f"{dft.XC} DF({dft.AUXBASIS}) + D3(BJ), PySCF default grids",
        "wall_s": 0.0, "dimers": []}
    record.setdefault("commands", []).append(  # every run that added to this file, in order
        f"python -m benchmarks.label_bsse --max-oo {arguments.max_oo} --clusters {arguments.clusters} "
        f"--cluster-waters {arguments.cluster_waters}")
    frames = load_frames(["data/water/labelled_*.extxyz.gz"])
    dimers = sorted((atoms for atoms in frames if atoms.info.get("source") == "dimer"
                     and atoms.get_distance(0, 3) < arguments.max_oo), key=lambda atoms: atoms.get_distance(0, 3))
    liquid = sorted((atoms for atoms in frames
                     if atoms.info.get("source") == "liquid-cluster" and len(atoms) >= 3 * arguments.cluster_waters),
                    key=lambda atoms: atoms.info["frame_id"])[: arguments.clusters]
    clusters = []
    for source in liquid:
        clusters.append(source[: 3 * arguments.cluster_waters])
        clusters[-1].info["frame_id"] = f"{source.info['frame_id']}[:{arguments.cluster_waters} waters]"

    def measure(name: str, systems: list, row_of, describe) -> None:
        """Append row_of(system) to record[name] for each system not there yet, saving after each."""
        done = {row["frame_id"] for row in record.setdefault(name, [])}
        for system in tqdm([s for s in systems if s.info["frame_id"] not in done], desc=name):
            started = time.perf_counter()
            row = row_of(system)
            record[name].append(row)
            record["wall_s"] += time.perf_counter() - started
            record["overbinding_by_distance"] = overbinding_by_distance(record["dimers"])
            arguments.out.write_text(json.dumps(record, indent=1) + "\n")
            tqdm.write(describe(row))

    measure("dimers", dimers, dimer_row, lambda row: (
        f"O-O {row['oo_distance_A']:.2f} Å: labels {row['label_meV']:6.1f} meV (DFT part {row['def2-tzvp']['raw_meV']:6.1f}), "
        f"CP def2-QZVP {row['reference_meV']:6.1f} meV: overbound by {row['label_overbinding_meV']:5.1f} meV"))
    measure("clusters", clusters, cluster_row, lambda row: (
        f"{row['waters']} waters: TZVP - QZVP interaction {row['cluster_meV']:6.1f} meV, sum over pairs "
        f"{row['sum_of_pairs_meV']:6.1f} meV (ratio {row['cluster_over_pairs']:.2f})"))

if __name__ == "__main__":
    main()
