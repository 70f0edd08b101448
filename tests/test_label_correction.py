"""The pairwise label correction (issue 6: labels that overbind close water pairs): its pair term, energy
and forces (finite differences, periodic images), the corrected frames and the dimer fit (training with it:
test_train.py)."""

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from emt_water import water_cluster
from e2former_calc.dataset import frame_labels
from e2former_calc.label_correction import PairCorrection, correct_labels, fit_dimer_correction

CORRECTION = PairCorrection(amplitude_eV=0.04, decay_per_A=0.75, switch_on_A=4.0, cutoff_A=5.5)


def test_pair_term_is_the_exponential_inside_and_switches_off_smoothly():
    assert CORRECTION.pair_energy(np.array(3.0))[0] == pytest.approx(0.04)
    r = np.linspace(2.0, 6.0, 4001)
    energy, slope = CORRECTION.pair_energy(r)
    inside = r <= 4.0
    np.testing.assert_allclose(energy[inside], 0.04 * np.exp(-0.75 * (r[inside] - 3.0)))
    assert np.all(energy[r >= 5.5] == 0) and np.all(slope[r >= 5.5] == 0)
    step = 1e-6
    numerical = (CORRECTION.pair_energy(r + step)[0] - CORRECTION.pair_energy(r - step)[0]) / (2 * step)
    np.testing.assert_allclose(slope, numerical, atol=1e-8)
    assert np.all(np.abs(np.diff(slope)) < 1e-4)  # continuous slope: no kink at the switch or the cutoff


def test_forces_are_minus_the_gradient_and_only_oxygen_pairs_count():
    atoms = water_cluster(4, np.random.default_rng(3))
    energy, forces = CORRECTION.energy_and_forces(atoms)
    assert energy > 0
    assert np.all(forces[atoms.numbers == 1] == 0)
    step = 1e-5
    for atom in np.flatnonzero(atoms.numbers == 8):
        for axis in range(3):
            shifted = [atoms.copy(), atoms.copy()]
            shifted[0].positions[atom, axis] += step
            shifted[1].positions[atom, axis] -= step
            up, down = (CORRECTION.energy_and_forces(a)[0] for a in shifted)
            assert forces[atom, axis] == pytest.approx(-(up - down) / (2 * step), abs=1e-8)
    np.testing.assert_allclose(forces.sum(axis=0), 0, atol=1e-12)


def test_periodic_images_are_pairs_too():
    atoms = Atoms("O2", positions=[[0, 0, 0], [4.5, 0, 0]], cell=np.diag([9.0, 20.0, 20.0]), pbc=True)
    energy, forces = CORRECTION.energy_and_forces(atoms)
    # the neighbour at +4.5 Å and its image at -4.5 Å: two pairs, equal and opposite pulls
    assert energy == pytest.approx(2 * CORRECTION.pair_energy(np.array(4.5))[0])
    np.testing.assert_allclose(forces, 0, atol=1e-12)
    atoms.pbc = [False, True, True]  # periodic only across the pair: one pair
    assert CORRECTION.energy_and_forces(atoms)[0] == pytest.approx(CORRECTION.pair_energy(np.array(4.5))[0])


def test_corrected_frames_add_the_correction_and_leave_the_input_alone():
    atoms = water_cluster(3, np.random.default_rng(1))
    energy, forces = frame_labels(atoms)
    (corrected,) = correct_labels([atoms], CORRECTION)
    delta_energy, delta_forces = CORRECTION.energy_and_forces(atoms)
    new_energy, new_forces = frame_labels(corrected)
    assert new_energy == pytest.approx(energy + delta_energy) and corrected.info["label_correction_eV"] == delta_energy
    np.testing.assert_allclose(new_forces, forces + delta_forces)
    assert frame_labels(atoms)[0] == energy and "label_correction_eV" not in atoms.info

    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=np.zeros(6))
    with pytest.raises(ValueError, match="stress"):
        correct_labels([atoms], CORRECTION)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="switch_on_A < cutoff_A"):
        PairCorrection(amplitude_eV=0.04, decay_per_A=0.75, switch_on_A=6.0, cutoff_A=5.0)
    with pytest.raises(ValueError, match="amplitude"):
        PairCorrection.from_dict({"amplitude": 0.04, "decay_per_A": 0.75})


def test_dimer_fit_recovers_known_parameters():
    rng = np.random.default_rng(0)
    distance = rng.uniform(2.4, 6.6, 60)
    truth = PairCorrection(amplitude_eV=0.05, decay_per_A=0.9)
    fitted, stats = fit_dimer_correction(distance, truth.pair_energy(distance)[0])
    assert fitted.amplitude_eV == pytest.approx(0.05, rel=1e-6) and fitted.decay_per_A == pytest.approx(0.9, rel=1e-6)
    assert stats["rmse_meV"] < 1e-6 and stats["loo_rmse_meV"] < 1e-6

    noisy, stats = fit_dimer_correction(distance, truth.pair_energy(distance)[0] + rng.normal(0, 0.005, 60))
    assert noisy.amplitude_eV == pytest.approx(0.05, rel=0.2) and 3 < stats["rmse_meV"] < 7
