"""Tests of the water DFT dataset pipeline: carving, plan, resumable labelling, merge, DFT plumbing."""

from __future__ import annotations

import gzip
import json

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.geometry import get_distances

from e2former_calc import datagen, dft, sampling
from e2former_calc.water import build_water_box


def liquid_like_snapshots(count: int = 3, n_molecules: int = 27) -> list[Atoms]:
    """Periodic boxes standing in for MD snapshots (no OpenMM needed), with shifted atoms so that
    molecules straddle the cell boundary."""
    snapshots = []
    for index in range(count):
        box = build_water_box(n_molecules, seed=index)
        box.positions += box.cell[0, 0] * 0.45  # not wrapped: some molecules now cross the boundary
        box.positions[1::3] -= box.cell[0, 0]  # and some hydrogens sit one cell away from their oxygen
        box.info.update(temperature_K=300.0, snapshot=index, seed=index)
        snapshots.append(box)
    return snapshots


def oh_lengths(frame: Atoms) -> np.ndarray:
    molecules = frame.positions.reshape(-1, 3, 3)
    return np.linalg.norm(molecules[:, 1:] - molecules[:, :1], axis=-1)


@pytest.mark.parametrize("n_waters", [1, 5, 13, 27])
def test_carved_cluster_has_the_n_nearest_whole_molecules(n_waters):
    snapshot = liquid_like_snapshots(1)[0]
    centre = 4
    cluster = sampling.carve_cluster(snapshot, centre, n_waters)

    assert cluster.get_chemical_symbols() == ["O", "H", "H"] * n_waters
    assert not cluster.pbc.any()
    np.testing.assert_allclose(cluster.positions[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(oh_lengths(cluster), 0.9572, atol=1e-6)  # whole, rigid molecules
    _, oo_mic = get_distances(snapshot.positions[centre * 3], snapshot.positions[::3], snapshot.cell, pbc=True)
    expected = np.sort(oo_mic[0])[:n_waters]
    carved = np.sort(np.linalg.norm(cluster.positions[::3], axis=-1))
    np.testing.assert_allclose(carved, expected, atol=1e-9)
    assert cluster.info["n_waters"] == n_waters and cluster.info["centre"] == centre
    assert cluster.info["source"] == "liquid-cluster" and cluster.info["temperature_K"] == 300.0


def test_carved_cluster_rejects_impossible_size():
    with pytest.raises(ValueError):
        sampling.carve_cluster(liquid_like_snapshots(1)[0], 0, 28)


def test_dimer_and_monomer_geometry():
    snapshot = liquid_like_snapshots(1)[0]
    dimer = sampling.carve_dimer(snapshot, centre=2, partner_rank=1, oo_distance=3.7)
    assert np.linalg.norm(dimer.positions[3] - dimer.positions[0]) == pytest.approx(3.7)
    np.testing.assert_allclose(oh_lengths(dimer), 0.9572, atol=1e-6)
    monomer = sampling.distort_monomer(snapshot, centre=2, bond_lengths=(0.9, 1.1), angle_degrees=97.0)
    np.testing.assert_allclose(oh_lengths(monomer)[0], [0.9, 1.1])
    first, second = monomer.positions[1:] - monomer.positions[0]
    cosine = first @ second / np.linalg.norm(first) / np.linalg.norm(second)
    assert np.rad2deg(np.arccos(cosine)) == pytest.approx(97.0)


def make_plan(seed: int, counts=(10, 15, 60)) -> list[Atoms]:
    frames = datagen.carve_plan_frames(liquid_like_snapshots(), *counts, seed=seed)
    return datagen.order_by_fair_share(frames, seed)


def test_plan_is_deterministic_and_ordered_cheap_first():
    first, again, other = make_plan(0), make_plan(0), make_plan(1)
    assert [f.info["config_id"] for f in first] == [f.info["config_id"] for f in again]
    assert [f.info["config_id"] for f in first] != [f.info["config_id"] for f in other]
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(first, again))
    assert [f.info["plan_index"] for f in first] == list(range(len(first)))
    assert len({f.info["config_id"] for f in first}) == len(first)
    sizes = np.array([f.info["n_waters"] for f in first])
    assert sizes.min() == 1 and sizes.max() > 12
    assert all(min_distance > datagen.MIN_CONTACT for min_distance in map(sampling.min_intermolecular_distance, first))
    # Any prefix is mixed: the first quarter already has medium clusters, and is cheaper per frame than the rest.
    quarter = sizes[: len(sizes) // 4]
    assert np.any((quarter >= 7) & (quarter <= 12))
    assert quarter.mean() < sizes[len(sizes) // 4:].mean()


def test_default_plan_mix_meets_the_size_target():
    frames = datagen.carve_plan_frames(liquid_like_snapshots(), 60, 100, 640, seed=0)
    sizes = np.array([f.info["n_waters"] for f in frames])
    assert len(frames) >= 600 and np.mean(sizes >= 8) >= 0.4


def fake_label(atoms: Atoms) -> dft.DFTLabel:
    """A deterministic stand-in for DFT: energy and forces from the positions."""
    return dft.DFTLabel(
        energy=float(-atoms.positions.sum()), forces=np.cos(atoms.positions), dispersion_energy=-0.01,
        method="fake", wall_seconds=0.1, scf_cycles=7, device="cpu",
    )


class CountingLabeller:
    """fake_label that records the frames it saw, fails on chosen config_ids and can be 'killed'."""

    def __init__(self, fail_ids=(), kill_on_call=None):
        self.seen, self.fail_ids, self.kill_on_call = [], set(fail_ids), kill_on_call

    def __call__(self, atoms):
        self.seen.append(atoms.info["config_id"])
        if len(self.seen) == self.kill_on_call:
            raise KeyboardInterrupt  # what a kill looks like: not caught, run stops
        if atoms.info["config_id"] in self.fail_ids:
            raise dft.SCFNotConverged("test failure")
        return fake_label(atoms)


def test_labelling_resumes_records_failures_and_merges(tmp_path):
    plan = make_plan(0, counts=(3, 3, 6))
    ids = [f.info["config_id"] for f in plan]

    killed = CountingLabeller(kill_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        datagen.label_plan(plan, tmp_path, killed)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == sorted(f"{i}.extxyz" for i in ids[:2])

    plan[3].info["md_step"] = np.int64(4200)  # as frames read back from extxyz carry them
    limited = CountingLabeller(fail_ids={ids[3]})
    counts = datagen.label_plan(plan, tmp_path, limited, limit=3)
    assert limited.seen == ids[2:5] and counts == {"skipped": 2, "labelled": 2, "failed": 1}
    assert json.loads((tmp_path / "failed" / f"{ids[3]}.json").read_text())["md_step"] == 4200

    first_chunk = datagen.merge_frames(tmp_path)
    assert datagen.merge_frames(tmp_path) is None
    class ConcurrentRun(CountingLabeller):
        """Another labelling run finishes frame 6 while this one works on frame 5."""

        def __call__(self, atoms):
            if atoms.info["config_id"] == ids[5]:
                ase.io.write(tmp_path / "frames" / f"{ids[6]}.extxyz", datagen.labelled_frame(plan[6], fake_label(plan[6])))
            return super().__call__(atoms)

    rest = ConcurrentRun()
    counts = datagen.label_plan(plan, tmp_path, rest)
    assert rest.seen == ids[5:6] + ids[7:]  # neither done, failed nor concurrently finished frames are redone
    assert counts == {"skipped": 6, "labelled": len(ids) - 6}
    second_chunk = datagen.merge_frames(tmp_path)
    assert [first_chunk.name, second_chunk.name] == ["labelled_000.extxyz.gz", "labelled_001.extxyz.gz"]

    chunks = [datagen.read_chunk(first_chunk), datagen.read_chunk(second_chunk)]
    assert [f.info["config_id"] for f in chunks[0]] == [ids[i] for i in (0, 1, 2, 4)]
    assert [f.info["config_id"] for f in chunks[1]] == ids[5:]
    by_id = {f.info["config_id"]: f for f in plan}
    for frame in chunks[0] + chunks[1]:
        source = by_id[frame.info["config_id"]]
        np.testing.assert_allclose(frame.positions, source.positions, atol=1e-7)
        expected = fake_label(source)
        assert frame.get_potential_energy() == pytest.approx(expected.energy)
        np.testing.assert_allclose(frame.get_forces(), expected.forces, atol=1e-7)
        assert (frame.info["charge"], frame.info["spin"], frame.info["method"]) == (0, 1, "fake")
        assert frame.info["scf_cycles"] == 7
        for key in ("source", "seed", "n_waters", "temperature_K", "snapshot", "centre", "plan_index"):
            assert frame.info[key] == source.info[key]
    assert not list(tmp_path.rglob("*.tmp"))

    card = datagen.data_card(tmp_path)
    assert "11 labelled frames (11 merged into chunks)" in card and "1 failed" in card


def test_label_command_line_with_stand_in_dft(tmp_path, monkeypatch):
    plan_path = tmp_path / "plan.extxyz"
    ase.io.write(plan_path, make_plan(0, counts=(2, 2, 4)), format="extxyz")
    monkeypatch.setattr(dft, "label_atoms", lambda atoms, device: fake_label(atoms))
    out_dir = tmp_path / "water"
    datagen.main(["label", str(plan_path), "--out-dir", str(out_dir), "--max-waters", "2", "--order", "large-first"])
    labelled = [ase.io.read(p) for p in (out_dir / "frames").glob("*.extxyz")]
    assert labelled and all(f.info["n_waters"] <= 2 for f in labelled)
    assert "done" in (out_dir / "labelling.log").read_text()
    datagen.main(["merge", "--out-dir", str(out_dir)])
    datagen.main(["card", "--out-dir", str(out_dir)])
    assert f"{len(labelled)} labelled frames" in (out_dir / "README.md").read_text()
    with gzip.open(out_dir / "labelled_000.extxyz.gz", "rt") as handle:
        assert len(ase.io.read(handle, ":", format="extxyz")) == len(labelled)


def distorted_water() -> Atoms:
    return Atoms("OH2", positions=[[0.0, 0.0, 0.05], [0.78, 0.0, 0.6], [-0.74, 0.1, 0.5]])


def limit_diis_cycles(monkeypatch, cycles: int) -> None:
    """Make every SCF that dft.build_scf returns stop its DIIS iterations after `cycles`."""
    original = dft.build_scf

    def limited(*args, **kwargs):
        scf = original(*args, **kwargs)
        scf.max_cycle = cycles
        return scf

    monkeypatch.setattr(dft, "build_scf", limited)


def test_unconverged_scf_is_an_error(monkeypatch):
    pytest.importorskip("pyscf")
    limit_diis_cycles(monkeypatch, 1)
    monkeypatch.setattr(dft, "SECOND_ORDER_MAX_CYCLE", 1)
    with pytest.raises(dft.SCFNotConverged):
        dft.label_atoms(distorted_water(), basis="sto-3g", auxbasis="weigend")


def test_second_order_scf_finishes_what_diis_could_not(monkeypatch):
    pytest.importorskip("pyscf")
    reference = dft.label_atoms(distorted_water(), basis="sto-3g", auxbasis="weigend")
    limit_diis_cycles(monkeypatch, 2)
    rescued = dft.label_atoms(distorted_water(), basis="sto-3g", auxbasis="weigend")
    assert rescued.scf_cycles > 2
    assert rescued.energy == pytest.approx(reference.energy, abs=1e-6)
    np.testing.assert_allclose(rescued.forces, reference.forces, atol=1e-4)


def test_ghost_atoms_carry_basis_functions_but_no_electrons():
    pytest.importorskip("pyscf")
    dimer = Atoms("OH2OH2", positions=[[0, 0, 0], [0, 0.76, 0.59], [0, -0.76, 0.59],
                                       [2.9, 0, 0], [3.3, 0.76, 0.2], [3.3, -0.76, 0.2]])
    first = np.arange(6) < 3
    monomer = dft.build_molecule(dimer[first], basis="sto-3g")
    with_ghosts = dft.build_molecule(dimer, basis="sto-3g", ghost=~first)
    assert with_ghosts.nelectron == monomer.nelectron == 10
    assert with_ghosts.nao == 2 * monomer.nao
    assert with_ghosts.energy_nuc() == pytest.approx(monomer.energy_nuc())
    # the partner's functions can only lower the monomer's variational energy (the BSSE)
    assert with_ghosts.RHF().kernel() < monomer.RHF().kernel()


@pytest.mark.slow
def test_revpbe_d3bj_forces_match_finite_differences():
    pytest.importorskip("pyscf")
    pytest.importorskip("pyscf.dispersion")
    from ase.units import Hartree

    atoms = distorted_water()
    label = dft.label_atoms(atoms)
    assert label.method == dft.METHOD and label.dispersion_energy < 0
    np.testing.assert_allclose(label.forces.sum(axis=0), 0.0, atol=2e-3)

    def energy(positions):
        return float(dft.build_scf(Atoms("OH2", positions=positions)).kernel()) * Hartree

    step = 1e-3
    for atom, axis in [(1, 0), (2, 2)]:
        plus, minus = atoms.positions.copy(), atoms.positions.copy()
        plus[atom, axis] += step
        minus[atom, axis] -= step
        finite_difference = -(energy(plus) - energy(minus)) / (2 * step)
        # PySCF's analytic gradient omits the grid response; measured agreement ~1e-4 eV/Å.
        assert label.forces[atom, axis] == pytest.approx(finite_difference, abs=1e-3)


def test_flexible_md_samples_stretches_and_is_reproducible():
    pytest.importorskip("openmm", reason="OpenMM is an optional dependency of the dataset pipeline")
    run = dict(temperature_K=300.0, n_snapshots=2, seed=5, n_molecules=8, equilibration_ps=0.2, interval_ps=0.2)
    snapshots, again = sampling.sample_liquid(**run), sampling.sample_liquid(**run)
    np.testing.assert_array_equal(snapshots[-1].positions, again[-1].positions)
    lengths = oh_lengths(snapshots[-1])
    assert lengths.std() > 0.005 and 0.85 < lengths.mean() < 1.1  # flexible, but intact molecules
    assert snapshots[1].info == {"temperature_K": 300.0, "snapshot": 1, "seed": 5, "time_ps": pytest.approx(0.6)}


def test_data_card_lists_each_active_learning_round_by_kind():
    def frame(source, al_round, n_waters):
        atoms = Atoms("OH2" * n_waters, positions=np.arange(9 * n_waters, dtype=float).reshape(-1, 3))
        atoms.info.update(source=source, al_round=al_round, n_waters=n_waters, temperature_K=300.0)
        return atoms

    frames = [frame("active-learning", 3, 4), frame("active-learning", 3, 8), frame("md-failure", 3, 6),
              frame("active-learning", 1, 5), frame("liquid-cluster", 0, 7)]
    assert datagen.active_learning_rounds(frames).splitlines() == [
        "- round 1: 1 committee-selected clusters (5–5 waters, MD at 300 K)",
        "- round 3: 2 committee-selected clusters (4–8 waters, MD at 300 K); "
        "1 clusters around a failed run's broken waters (6–6 waters, MD at 300 K)",
    ]
