"""g(r): ideal gas gives 1, a crystal matches ASE's get_rdf, the shipped experiment has its
known first peak, and misuse (too large rmax, no periodicity) is refused clearly."""

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.geometry.rdf import get_rdf

from e2former_calc.rdf import (
    EXPERIMENTS,
    RDFResult,
    compare_with_experiment,
    compute_rdf,
    load_experimental_rdf,
    max_rdf_radius,
    plot_rdf,
    rdf_metrics,
    write_rdf_csv,
)


def ideal_gas(n_atoms, length, rng):
    return Atoms(f"O{n_atoms}", positions=rng.uniform(0, length, (n_atoms, 3)),
                 cell=[length] * 3, pbc=True)


def test_ideal_gas_gives_one():
    rng = np.random.default_rng(0)
    frames = [ideal_gas(200, 12.0, rng) for _ in range(20)]
    result = compute_rdf(frames, pair=("O", "O"), rmax=6.0, bin_width=0.5)
    # Shells beyond 2 Å hold ~100+ pairs per frame: relative noise well under 5 %.
    far = result.r > 2.0
    assert np.all(np.abs(result.g[far] - 1) < 0.1)
    assert abs(result.g[far].mean() - 1) < 0.02
    assert result.partner_density == pytest.approx(200 / 12.0**3)


def test_skewed_cell_counts_every_neighbour_once():
    # fcc primitive cell (60° angles) repeated 3×: rmax = 3.12 Å holds exactly the 12 nearest
    # neighbours at a/√2, several of them through images across skewed faces.
    atoms = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))
    result = compute_rdf(atoms, pair=("Cu", "Cu"), bin_width=0.01)
    assert result.rmax == pytest.approx(max_rdf_radius(atoms), abs=0.01)
    neighbours_per_atom = (len(atoms) - 1) / atoms.get_volume() * np.sum(
        result.g * 4 / 3 * np.pi * np.diff(result.bin_edges**3)
    )
    assert neighbours_per_atom == pytest.approx(12.0, abs=1e-9)
    assert result.r[np.argmax(result.g)] == pytest.approx(3.6 / np.sqrt(2), abs=0.01)


def test_matches_ase_get_rdf_on_a_crystal():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(3)
    atoms.rattle(0.05, seed=1)
    for pair in [("Na", "Cl"), ("Cl", "Cl")]:
        ours = compute_rdf(atoms, pair=pair, rmax=8.0, bin_width=0.1)
        theirs, r = get_rdf(atoms, rmax=8.0, nbins=80, elements=pair)
        n_b = atoms.get_chemical_symbols().count(pair[1])
        # ASE normalises by N_B, we by N_B - 1 for like pairs (see the module docstring).
        scale = n_b / (n_b - 1) if pair[0] == pair[1] else 1.0
        np.testing.assert_allclose(ours.r, r)
        np.testing.assert_allclose(ours.g, theirs * scale, rtol=1e-10, atol=1e-10)
        assert ours.g.max() > 1.0


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experimental_table_has_the_known_first_peak(name):
    experiment = load_experimental_rdf(name)
    assert "doi:10." in experiment.citation
    metrics = rdf_metrics(experiment.r, experiment.g, experiment.number_density)
    json.dumps(metrics)
    assert metrics["first_peak_position_angstrom"] == pytest.approx(2.80, abs=0.03)
    assert 2.4 < metrics["first_peak_height"] < 2.7
    assert 3.3 < metrics["first_minimum_position_angstrom"] < 3.6
    assert 4.0 < metrics["coordination_number_3p3"] < 4.7


def test_comparison_of_experiment_with_itself_is_exact(tmp_path):
    experiment = load_experimental_rdf("skinner2013")
    # Bin the experimental curve as if it came from a simulation with rmax = 6 Å.
    edges = np.arange(0, 6.0001, 0.01)
    centres = 0.5 * (edges[1:] + edges[:-1])
    result = RDFResult(r=centres, g=np.interp(centres, experiment.r, experiment.g),
                       bin_edges=edges, pair=("O", "O"), n_frames=1,
                       partner_density=experiment.number_density)
    comparison = compare_with_experiment(result, experiment)
    json.dumps(comparison)
    assert comparison["rmse"] < 0.02
    assert comparison["rmse_range_angstrom"] == [2.5, pytest.approx(5.995)]
    assert abs(comparison["first_peak_position_angstrom_difference"]) < 0.01
    shifted = RDFResult(r=centres, g=np.interp(centres + 0.2, experiment.r, experiment.g),
                        bin_edges=edges, pair=("O", "O"), n_frames=1,
                        partner_density=experiment.number_density)
    worse = compare_with_experiment(shifted, experiment)
    assert worse["rmse"] > 0.1
    assert worse["first_peak_position_angstrom_difference"] == pytest.approx(-0.2, abs=0.02)

    write_rdf_csv(tmp_path / "rdf.csv", result)
    table = np.loadtxt(tmp_path / "rdf.csv", delimiter=",", comments="#", skiprows=2)
    np.testing.assert_allclose(table[:, 1], result.g, atol=1e-6)
    plot_rdf(tmp_path / "rdf.png", result, experiment=experiment)
    assert (tmp_path / "rdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rmax_beyond_half_the_cell_height_raises():
    atoms = Atoms("O2", positions=[[0, 0, 0], [1, 1, 1]], cell=[10, 10, 6], pbc=True)
    assert max_rdf_radius(atoms) == pytest.approx(3.0)
    compute_rdf(atoms, rmax=3.0)
    with pytest.raises(ValueError, match="half the shortest cell height"):
        compute_rdf(atoms, rmax=3.1)


def test_non_periodic_input_is_rejected():
    atoms = Atoms("O2", positions=[[0, 0, 0], [1, 1, 1]], cell=[10] * 3, pbc=[True, True, False])
    with pytest.raises(ValueError, match="periodic in all three directions"):
        compute_rdf(atoms, rmax=2.0)
