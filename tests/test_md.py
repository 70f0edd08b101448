"""MD drivers: thermostats reach their target, NVE conserves energy, restarts continue the
same trajectory, and the watchdog stops blow-ups. Solid argon with Lennard-Jones keeps it fast."""

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.lj import LennardJones
from ase.constraints import FixBondLengths
from ase.io import read

from e2former_calc.cli import rigid_tip3p_water
from e2former_calc.md import (
    MDWatchdogError,
    Watchdog,
    energy_drift_meV_per_atom_ps,
    read_md_log,
    run_md,
)
from e2former_calc.water import build_water_box


class StatelessLennardJones(LennardJones):
    """ASE's Lennard-Jones keeps a neighbour list with a skin between calls, so the summation
    order (and the last bit of the forces) depends on the history; rebuilding it every call
    makes the forces a function of the positions alone, as a bit-exact restart needs."""

    def calculate(self, *args, **kwargs):
        self.nl = None
        super().calculate(*args, **kwargs)


def argon(calculator=LennardJones):
    """fcc argon (32 atoms), a solid at the temperatures used here."""
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    atoms.calc = calculator(sigma=3.4, epsilon=0.0104, rc=7.0, smooth=True)
    return atoms


@pytest.mark.parametrize("ensemble", ["nose-hoover", "bussi", "langevin"])
def test_thermostat_reaches_target_temperature(ensemble, tmp_path):
    # Started at 40 K, the solid would equilibrate near 20 K (equipartition) without a thermostat.
    result = run_md(
        argon(), ensemble, temperature_K=40.0, timestep_fs=5.0, steps=600, output_dir=tmp_path,
        seed=3, log_interval=1, coupling_time_fs=50.0, progress=False,
    )
    columns, _ = read_md_log(result.log_path)
    mean_temperature = columns["temperature_K"][200:].mean()
    assert mean_temperature == pytest.approx(40.0, rel=0.1)


def test_nve_conserves_energy(tmp_path):
    result = run_md(
        argon(), "nve", temperature_K=40.0, timestep_fs=5.0, steps=400, output_dir=tmp_path,
        log_interval=1, progress=False,
    )
    columns, n_atoms = read_md_log(result.log_path)
    drift = energy_drift_meV_per_atom_ps(result.log_path)
    print(f"NVE argon, 5 fs: drift {drift:.2e} meV/atom/ps")
    assert abs(drift) < 0.05
    assert np.ptp(columns["etot_eV"]) / n_atoms < 1e-4
    # Kinetic and potential energy do exchange, so the test above is not trivially true.
    assert np.ptp(columns["ekin_eV"]) / n_atoms > 1e-3


def test_energy_drift_helper_recovers_a_planted_slope(tmp_path):
    log = tmp_path / "md.log"
    time_ps = np.linspace(0, 2, 21)
    etot = -5.0 + 0.010 * time_ps  # 10 meV/ps over 4 atoms
    rows = "".join(f"{k} {t} 0 0 {e} 0\n" for k, (t, e) in enumerate(zip(time_ps, etot)))
    log.write_text(f"# header n_atoms=4\n# columns\n{rows}")
    assert energy_drift_meV_per_atom_ps(log) == pytest.approx(2.5)


@pytest.mark.parametrize("ensemble", ["nve", "nose-hoover", "bussi", "langevin"])
def test_restart_continues_the_same_trajectory(ensemble, tmp_path):
    settings = dict(
        ensemble=ensemble, temperature_K=40.0, timestep_fs=5.0, seed=7, trajectory_interval=5,
        log_interval=5, restart_interval=20, progress=False,
    )
    def fresh():
        return argon(StatelessLennardJones)

    straight = run_md(fresh(), steps=60, output_dir=tmp_path / "straight", **settings)
    split_first = run_md(fresh(), steps=30, output_dir=tmp_path / "split", **settings)
    assert split_first.steps == 30
    split = run_md(fresh(), steps=60, output_dir=tmp_path / "split", **settings)
    assert split.started_from_step == 30
    # A crashed run leaves frames and log lines after its last save (step 20): a restart must
    # drop them and redo steps 21-30. The crash is simulated by restoring the step-20 state.
    run_md(fresh(), steps=20, output_dir=tmp_path / "crashed", **settings)
    saved_state = (tmp_path / "crashed" / "restart.npz").read_bytes()
    run_md(fresh(), steps=30, output_dir=tmp_path / "crashed", **settings)
    (tmp_path / "crashed" / "restart.npz").write_bytes(saved_state)
    resumed = run_md(fresh(), steps=60, output_dir=tmp_path / "crashed", **settings)
    assert resumed.started_from_step == 20

    reference = read(straight.trajectory_path, ":")
    assert [frame.info["step"] for frame in reference] == list(range(0, 61, 5))
    for continued in (split, resumed):
        frames = read(continued.trajectory_path, ":")
        assert [frame.info["step"] for frame in frames] == list(range(0, 61, 5))
        for a, b in zip(reference, frames):
            np.testing.assert_array_equal(a.positions, b.positions)
            np.testing.assert_array_equal(a.get_momenta(), b.get_momenta())
        assert continued.log_path.read_text() == straight.log_path.read_text()
    np.testing.assert_array_equal(
        np.load(straight.restart_path)["positions"], np.load(split.restart_path)["positions"]
    )


def test_restart_refuses_a_different_ensemble(tmp_path):
    run_md(argon(), "nve", 40.0, 5.0, steps=5, output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="restart=False"):
        run_md(argon(), "bussi", 40.0, 5.0, steps=10, output_dir=tmp_path, progress=False)


def test_rigid_tip3p_water_stays_rigid_under_bussi(tmp_path):
    atoms = rigid_tip3p_water(build_water_box(4, seed=1))
    bonds = atoms.constraints[0].pairs
    assert len(bonds) == 12
    before = np.array([atoms.get_distance(i, j) for i, j in bonds])
    np.testing.assert_allclose(before[0::3], 0.9572, atol=1e-6)  # O-H, molecules made whole
    result = run_md(atoms, "bussi", 300.0, 1.0, steps=20, output_dir=tmp_path, progress=False)
    after = np.array([atoms.get_distance(i, j) for i, j in bonds])
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert np.any(np.abs(atoms.positions - read(result.trajectory_path, 0).positions) > 0.01)
    # Temperature counts the 6 degrees of freedom left per rigid molecule.
    assert atoms.get_number_of_degrees_of_freedom() == 4 * 6


def test_nose_hoover_rejects_constraints(tmp_path):
    atoms = argon()
    atoms.constraints = FixBondLengths([(0, 1)])
    with pytest.raises(ValueError, match="constraints"):
        run_md(atoms, "nose-hoover", 40.0, 5.0, steps=5, output_dir=tmp_path, progress=False)


def test_watchdog_stops_an_overlap_blow_up(tmp_path):
    atoms = argon()
    atoms.positions[1] = atoms.positions[0] + [1.2, 0, 0]  # 1.2 Å apart: enormous repulsion
    with pytest.raises(MDWatchdogError) as caught:
        run_md(atoms, "nve", 40.0, 5.0, steps=50, output_dir=tmp_path, progress=False,
               watchdog=Watchdog(max_temperature_K=2000.0))
    error = caught.value
    assert error.step >= 1 and "temperature" in error.reason
    last_good = read(error.last_good_path)
    assert last_good.info["step"] == error.step - 1
    assert np.all(np.isfinite(last_good.positions))


class NaNAfter(LennardJones):
    """Lennard-Jones that starts returning NaN forces after `good_calls` evaluations."""

    def __init__(self, good_calls, **kwargs):
        super().__init__(**kwargs)
        self.good_calls = good_calls

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.good_calls -= 1
        if self.good_calls < 0:
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)


def test_watchdog_stops_on_nan_forces(tmp_path):
    atoms = argon()
    atoms.calc = NaNAfter(good_calls=6, sigma=3.4, epsilon=0.0104, rc=7.0, smooth=True)
    with pytest.raises(MDWatchdogError, match="non-finite forces") as caught:
        run_md(atoms, "nve", 40.0, 5.0, steps=50, output_dir=tmp_path, progress=False)
    # One evaluation at step 0, one per velocity-Verlet step: forces go bad at step 6.
    assert caught.value.step == 6
    assert read(caught.value.last_good_path).info["step"] == 5


def test_wall_clock_budget_stops_and_resumes_the_same_trajectory(tmp_path):
    settings = dict(
        ensemble="bussi", temperature_K=40.0, timestep_fs=5.0, steps=24, seed=7, trajectory_interval=5,
        log_interval=5, restart_interval=100, progress=False,
    )
    straight = run_md(argon(StatelessLennardJones), output_dir=tmp_path / "straight", **settings)
    assert straight.completed and straight.steps == 24
    # max_seconds=0: every call does one step, saves its state (off the restart interval) and returns.
    chunks = []
    while not chunks or not chunks[-1].completed:
        chunks.append(run_md(argon(StatelessLennardJones), output_dir=tmp_path / "chunked", max_seconds=0.0,
                             **settings))
    assert [(chunk.started_from_step, chunk.steps) for chunk in chunks] == [(k, k + 1) for k in range(24)]
    assert [chunk.completed for chunk in chunks] == [False] * 23 + [True]
    frames, reference = read(chunks[-1].trajectory_path, ":"), read(straight.trajectory_path, ":")
    assert [frame.info["step"] for frame in frames] == [0, 5, 10, 15, 20]
    for a, b in zip(reference, frames):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.get_momenta(), b.get_momenta())
    assert chunks[-1].log_path.read_text() == straight.log_path.read_text()


def test_keep_momenta_starts_from_the_given_momenta(tmp_path):
    atoms = argon()
    momenta = np.random.default_rng(0).normal(scale=0.05, size=(len(atoms), 3))
    atoms.set_momenta(momenta)
    result = run_md(atoms, "nve", 40.0, 5.0, steps=2, output_dir=tmp_path, keep_momenta=True, progress=False)
    np.testing.assert_allclose(read(result.trajectory_path, 0).get_momenta(), momenta, atol=1e-7)  # extxyz: 8 decimals
