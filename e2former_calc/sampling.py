"""Classical sampling of liquid water and carving of finite clusters to label with DFT.

Two steps:

* `sample_liquid` runs Langevin MD of a periodic liquid-density box with flexible TIP3P (OpenMM,
  `rigidWater=False`, so O–H stretches and H–O–H bends are sampled) and returns snapshots.
  OpenMM is an optional dependency of the dataset pipeline only.
* `carve_cluster`, `carve_dimer` and `distort_monomer` cut finite configurations out of a
  snapshot: whole molecules, unwrapped across the periodic boundaries, centred on a chosen water.

Every returned frame carries its provenance in `atoms.info`: `source`, `seed`, `n_waters`,
`temperature_K`, `snapshot` (index within its temperature's trajectory) and `centre` (molecule
index the frame was carved around). Snapshots and frames have atoms ordered O, H, H per molecule.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from tqdm import tqdm

from e2former_calc.water import build_water_box

ATOMS_PER_WATER = 3


def sample_liquid(
    temperature_K: float,
    n_snapshots: int,
    seed: int,
    n_molecules: int = 125,
    density_g_cm3: float = 0.997,
    equilibration_ps: float = 20.0,
    interval_ps: float = 2.0,
    timestep_fs: float = 0.5,
) -> list[Atoms]:
    """`n_snapshots` periodic frames of flexible-TIP3P water (NVT, Langevin, PME), `interval_ps` apart.

    Starts from `build_water_box(n_molecules, density_g_cm3, seed)`, minimises, equilibrates for
    `equilibration_ps`, then records. Positions in Å, molecules whole (OpenMM does not wrap).
    Each snapshot's info holds `temperature_K`, `snapshot`, `seed` and `time_ps`.
    """
    import openmm
    from openmm import app, unit

    box = build_water_box(n_molecules, density_g_cm3, seed=seed)
    topology = app.Topology()
    chain = topology.addChain()
    for _ in range(n_molecules):
        residue = topology.addResidue("HOH", chain)
        oxygen = topology.addAtom("O", app.element.oxygen, residue)
        for name in ("H1", "H2"):
            topology.addBond(oxygen, topology.addAtom(name, app.element.hydrogen, residue))
    length_nm = box.cell[0, 0] / 10.0
    topology.setPeriodicBoxVectors(np.eye(3) * length_nm * unit.nanometer)
    system = app.ForceField("tip3p.xml").createSystem(
        topology,
        nonbondedMethod=app.PME,
        nonbondedCutoff=min(0.9, 0.49 * length_nm) * unit.nanometer,
        constraints=None,
        rigidWater=False,
    )
    integrator = openmm.LangevinMiddleIntegrator(
        temperature_K * unit.kelvin, 1.0 / unit.picosecond, timestep_fs * unit.femtosecond
    )
    integrator.setRandomNumberSeed(seed + 1)  # OpenMM treats seed 0 as "pick one at random"
    # One thread and fixed-point force sums: the same seed then gives the same trajectory (not so with 2 threads).
    platform = openmm.Platform.getPlatformByName("CPU")
    simulation = app.Simulation(topology, system, integrator, platform, {"Threads": "1", "DeterministicForces": "true"})
    simulation.context.setPositions(box.positions / 10.0 * unit.nanometer)
    simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(temperature_K * unit.kelvin, seed + 1)

    steps_per_ps = round(1000.0 / timestep_fs)
    snapshots = []
    progress = tqdm(total=n_snapshots, desc=f"flexible TIP3P MD at {temperature_K:g} K", unit="snapshot")
    simulation.step(round(equilibration_ps * steps_per_ps))
    for index in range(n_snapshots):
        simulation.step(round(interval_ps * steps_per_ps))
        state = simulation.context.getState(getPositions=True)
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        snapshot = Atoms(box.get_chemical_symbols(), positions=positions, cell=box.cell, pbc=True)
        snapshot.info.update(
            temperature_K=float(temperature_K),
            snapshot=index,
            seed=seed,
            time_ps=equilibration_ps + (index + 1) * interval_ps,
        )
        snapshots.append(snapshot)
        progress.update()
    progress.close()
    return snapshots


def whole_molecules(snapshot: Atoms, centre: int) -> np.ndarray:
    """Positions [n_molecules, 3, 3] (Å) of every water, each whole and placed at the minimum image
    of its oxygen relative to molecule `centre`'s oxygen, which sits at the origin."""
    positions = snapshot.positions.reshape(-1, ATOMS_PER_WATER, 3)
    cell = snapshot.cell.array
    inverse = np.linalg.inv(cell)

    def minimum_image(vectors: np.ndarray) -> np.ndarray:
        fractional = vectors @ inverse
        return (fractional - np.round(fractional)) @ cell

    oxygens = minimum_image(positions[:, 0] - positions[centre, 0])
    hydrogens = oxygens[:, None, :] + minimum_image(positions[:, 1:] - positions[:, :1])
    return np.concatenate([oxygens[:, None, :], hydrogens], axis=1)


def carve_cluster(snapshot: Atoms, centre: int, n_waters: int) -> Atoms:
    """The `n_waters` waters whose oxygens are nearest (minimum image) to molecule `centre`'s oxygen,
    centre included, as a finite cluster with the centre's oxygen at the origin."""
    molecules = whole_molecules(snapshot, centre)
    if not 1 <= n_waters <= len(molecules):
        raise ValueError(f"n_waters must be in [1, {len(molecules)}], got {n_waters}")
    distances = np.linalg.norm(molecules[:, 0], axis=-1)
    nearest = np.argsort(distances, kind="stable")[:n_waters]
    cluster = Atoms("OH2" * n_waters, positions=molecules[nearest].reshape(-1, 3))
    cluster.info.update(_provenance(snapshot, "liquid-cluster", n_waters, centre))
    return cluster


def carve_dimer(snapshot: Atoms, centre: int, partner_rank: int, oo_distance: float) -> Atoms:
    """Molecule `centre` and its `partner_rank`-th nearest neighbour (1 = nearest), keeping both
    liquid geometries and their relative orientation, with the partner slid along the O–O axis
    so that the O–O distance is `oo_distance` Å."""
    molecules = whole_molecules(snapshot, centre)
    order = np.argsort(np.linalg.norm(molecules[:, 0], axis=-1), kind="stable")
    partner = molecules[order[partner_rank]]
    axis = partner[0] / np.linalg.norm(partner[0])
    partner = partner + (oo_distance - np.linalg.norm(partner[0])) * axis
    dimer = Atoms("OH2OH2", positions=np.concatenate([molecules[centre], partner]))
    dimer.info.update(_provenance(snapshot, "dimer", 2, centre))
    dimer.info["oo_distance"] = float(oo_distance)
    return dimer


def distort_monomer(snapshot: Atoms, centre: int, bond_lengths: tuple[float, float], angle_degrees: float) -> Atoms:
    """Molecule `centre` of the snapshot rebuilt in its own plane with O–H lengths `bond_lengths` (Å)
    and H–O–H angle `angle_degrees`, keeping the direction of its first O–H bond."""
    oxygen, first, second = whole_molecules(snapshot, centre)[centre]
    along = (first - oxygen) / np.linalg.norm(first - oxygen)
    across = (second - oxygen) - np.dot(second - oxygen, along) * along
    across /= np.linalg.norm(across)
    angle = np.deg2rad(angle_degrees)
    positions = [
        oxygen,
        oxygen + bond_lengths[0] * along,
        oxygen + bond_lengths[1] * (np.cos(angle) * along + np.sin(angle) * across),
    ]
    monomer = Atoms("OH2", positions=np.array(positions))
    monomer.info.update(_provenance(snapshot, "monomer", 1, centre))
    return monomer


def min_intermolecular_distance(frame: Atoms) -> float:
    """Smallest distance (Å) between atoms of different molecules; infinity for a monomer."""
    positions = frame.positions.reshape(-1, ATOMS_PER_WATER, 3)
    if len(positions) < 2:
        return float("inf")
    distances = np.linalg.norm(positions[:, None, :, None] - positions[None, :, None, :], axis=-1)
    different = ~np.eye(len(positions), dtype=bool)
    return float(distances[different].min())


def _provenance(snapshot: Atoms, source: str, n_waters: int, centre: int) -> dict:
    return dict(
        source=source,
        seed=int(snapshot.info["seed"]),
        n_waters=int(n_waters),
        temperature_K=float(snapshot.info["temperature_K"]),
        snapshot=int(snapshot.info["snapshot"]),
        centre=int(centre),
    )
