"""E2FormerCalculator with small random-weight models in float64."""

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError

from e2former_calc import E2FormerCalculator, save_model
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
from e2former_calc.neighbors import VerletGraphBuilder
from e2former_calc.water import build_water_box

CUTOFF = 3.5


def tiny_model(use_charge_spin=False, seed=0):
    torch.manual_seed(seed)
    config = E2FormerConfig(
        species=(1, 8), channels=16, num_blocks=2, num_heads=4, head_dim=4, cutoff=CUTOFF,
        num_radial=6, edge_hidden=8, avg_num_neighbors=10.0, use_charge_spin=use_charge_spin,
    )
    return E2FormerV2(config)


def calculator(use_charge_spin=False, **kwargs):
    options = dict(device="cpu", dtype="float64") | kwargs
    return E2FormerCalculator(tiny_model(use_charge_spin), **options)


@pytest.fixture(scope="module")
def calc():
    return calculator()


def water_box(n_molecules=4, seed=1):
    """A box of 4 waters is 4.9 Å wide, less than twice the 3.5 Å cutoff."""
    atoms = build_water_box(n_molecules, seed=seed)
    atoms.rattle(0.05, seed=seed)
    return atoms


def energy_forces_stress(atoms, *calculators):
    """[(energy, forces, stress)] of `atoms` with each calculator in turn."""
    results = []
    for calc in calculators:
        atoms.calc = calc
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    return results


def energy(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy()


def test_forces_are_minus_energy_gradient(calc):
    for atoms in (molecule("H2O2"), water_box()):
        atoms.calc = calc
        forces = atoms.get_forces()
        assert np.abs(forces).max() > 1e-3  # a non-trivial check
        step = 1e-4
        for index, axis in [(0, 0), (1, 2), (len(atoms) - 1, 1)]:
            shifted = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.positions[index, axis] += sign * step
                shifted.append(energy(moved, calc))
            numeric = -(shifted[0] - shifted[1]) / (2 * step)
            assert forces[index, axis] == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_stress_is_strain_derivative_over_volume(calc):
    atoms = water_box()
    atoms.set_cell(atoms.cell.array + [[0, 0, 0], [0.3, 0, 0], [-0.2, 0.4, 0]], scale_atoms=True)  # triclinic
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    assert np.abs(stress).max() > 1e-4
    cell, volume, step = atoms.cell.array.copy(), atoms.get_volume(), 1e-5
    for i in range(3):
        for j in range(i, 3):
            shifted = []
            for sign in (1, -1):
                deformation = np.eye(3)  # symmetric strain, eps_ij + eps_ji = step
                deformation[i, j] += sign * step / 2
                deformation[j, i] += sign * step / 2
                strained = atoms.copy()
                strained.set_cell(cell @ deformation, scale_atoms=True)
                shifted.append(energy(strained, calc))
            numeric = (shifted[0] - shifted[1]) / (2 * step * volume)
            assert stress[i, j] == pytest.approx(numeric, rel=1e-5, abs=1e-9), (i, j)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)


@pytest.mark.parametrize("n_molecules, repeat", [(2, 2), (1, 2)])  # 3.9 Å and 3.1 Å cells, cutoff 3.5 Å
def test_supercell_is_extensive(calc, n_molecules, repeat):
    atoms = water_box(n_molecules, seed=1)
    supercell = atoms.repeat(repeat)
    for system in (atoms, supercell):
        system.calc = calc
    n = len(atoms)
    assert supercell.get_potential_energy() / len(supercell) == pytest.approx(atoms.get_potential_energy() / n, rel=1e-10)
    np.testing.assert_allclose(supercell.get_forces()[:n], atoms.get_forces(), atol=1e-9)
    np.testing.assert_allclose(supercell.get_forces()[-n:], atoms.get_forces(), atol=1e-9)
    np.testing.assert_allclose(supercell.get_stress(), atoms.get_stress(), atol=1e-10)
    np.testing.assert_allclose(supercell.get_potential_energies()[:n], atoms.get_potential_energies(), atol=1e-9)


def test_atom_order_wrapping_and_sorting_do_not_matter(calc):
    atoms = water_box(seed=2)
    atoms.calc = calc
    reference = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(), atoms.get_potential_energies()
    permutation = np.random.default_rng(0).permutation(len(atoms))
    unwrapped = atoms.copy()
    unwrapped.positions[::2] += np.array([1, -2, 3]) @ atoms.cell.array  # images outside the cell
    unwrapped.positions += 0.41  # and a translation
    cases = {
        "permuted": (atoms[permutation], permutation, calc),
        "permuted unsorted": (atoms[permutation], permutation, calculator(spatial_sort=False)),
        "unwrapped": (unwrapped, np.arange(len(atoms)), calc),
    }
    for name, (other, index, other_calc) in cases.items():
        other.calc = other_calc
        assert other.get_potential_energy() == pytest.approx(reference[0], rel=1e-11), name
        np.testing.assert_allclose(other.get_forces(), reference[1][index], atol=1e-10, err_msg=name)
        np.testing.assert_allclose(other.get_stress(), reference[2], atol=1e-11, err_msg=name)
        np.testing.assert_allclose(other.get_potential_energies(), reference[3][index], atol=1e-10, err_msg=name)
    assert reference[3].sum() == pytest.approx(reference[0], rel=1e-12)


def test_charge_change_triggers_recompute():
    calc = calculator(use_charge_spin=True)
    atoms = molecule("H2O")
    atoms.calc = calc
    neutral = atoms.get_potential_energy()
    atoms.info["charge"] = 2  # 8 electrons: a singlet is consistent
    assert calc.calculation_required(atoms, ["energy"])
    charged = atoms.get_potential_energy()
    assert charged != pytest.approx(neutral, abs=1e-8)
    atoms.info.update(charge=1, spin=2)
    doublet = atoms.get_potential_energy()
    assert doublet != pytest.approx(charged, abs=1e-8)
    assert not calc.calculation_required(atoms, ["energy", "forces"])


def test_batch_equals_one_by_one():
    calc = calculator(use_charge_spin=True)
    cation = molecule("H2O")
    cation.info.update(charge=1, spin=2)
    systems = [water_box(seed=3), molecule("H2O2"), cation, water_box(1, seed=4)]
    batch = calc.calculate_batch(systems, ["energy", "forces", "energies"])
    for atoms, result in zip(systems, batch):
        atoms.calc = calc
        assert result["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
        np.testing.assert_allclose(result["forces"], atoms.get_forces(), atol=1e-11)
        np.testing.assert_allclose(result["energies"], atoms.get_potential_energies(), atol=1e-11)
    periodic = [water_box(seed=6), water_box(1, seed=6)]
    stresses = [result["stress"] for result in calc.calculate_batch(periodic, ["stress"])]
    for atoms, stress in zip(periodic, stresses):
        atoms.calc = calc
        np.testing.assert_allclose(stress, atoms.get_stress(), atol=1e-12)


def test_direct_mode_forces_and_no_stress():
    calc = calculator(mode="direct")
    atoms = water_box()
    atoms.calc = calc
    assert atoms.get_forces().shape == (len(atoms), 3) and np.isfinite(atoms.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError, match="stress needs mode='conservative'"):
        atoms.get_stress()


def test_float32_default_agrees_with_float64(calc):
    atoms = water_box()
    single = E2FormerCalculator(tiny_model(), device="cpu")
    assert energy(atoms, single) == pytest.approx(energy(atoms, calc), rel=1e-5)


@pytest.mark.parametrize(
    "make_atoms, message",
    [
        (lambda: Atoms("NaCl", positions=[[0, 0, 0], [2.4, 0, 0]]), r"element\(s\) Na \(Z=11\), Cl \(Z=17\); it supports H, O"),
        (lambda: Atoms(), "empty"),
        (lambda: Atoms("H2", positions=[[0, 0, 0], [np.inf, 0, 0]]), "NaN or inf"),
        (lambda: Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]], pbc=True), "cell vector there is zero"),
        (lambda: Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]], info={"charge": -1}), "trained without total charge and spin"),
    ],
)
def test_bad_atoms_raise_clear_errors(calc, make_atoms, message):
    atoms = make_atoms()
    atoms.calc = calc
    with pytest.raises(ValueError, match=message):
        atoms.get_potential_energy()


@pytest.mark.parametrize(
    "info, message",
    [
        ({"charge": 9}, r"charge'\]=9 is outside the model's range ±4"),
        ({"spin": 7}, r"spin'\]=7 \(multiplicity 2S\+1\) is outside the model's range 1..5"),
        ({"charge": 1}, "9 electrons need an even multiplicity"),
        ({"spin": 2}, "10 electrons need an odd multiplicity"),
        ({"charge": 0.5}, "must be an integer"),
    ],
)
def test_bad_charge_spin_raise_clear_errors(info, message):
    atoms = molecule("H2O")
    atoms.info.update(info)
    atoms.calc = calculator(use_charge_spin=True)
    with pytest.raises(ValueError, match=message):
        atoms.get_potential_energy()


def test_stress_of_non_periodic_system_is_refused(calc):
    atoms = molecule("H2O")
    atoms.calc = calc
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three directions"):
        atoms.get_stress()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "float16"}, "dtype must be 'float32' or 'float64', got 'float16'"),
        ({"device": "tpu"}, "device must be 'auto', 'cpu', 'cuda'"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"model": "e2former-v9-xl"}, r"neither a registered model name \(known: \[.*'e2former-v2-water-s'"),
        ({"model": "weights.pt"}, "pickle/zip checkpoint"),
        ({"device": "cpu", "cuda_graph": True, "skin": 1.0}, "cuda_graph=True needs a CUDA device"),
        ({"chunk_atoms": 0}, "chunk_atoms must be a positive integer"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    options = {"model": tiny_model()} | options
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        E2FormerCalculator(**options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        E2FormerCalculator(tiny_model(), device="cuda")


def test_auto_device_and_checkpoint_path(tmp_path):
    model = tiny_model(seed=3)
    save_model(model, tmp_path / "model")
    atoms = water_box()
    from_path = E2FormerCalculator(str(tmp_path / "model.json"), dtype="float64")
    assert from_path.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    from_instance = E2FormerCalculator(model, device=from_path.device, dtype="float64")
    assert energy(atoms, from_path) == pytest.approx(energy(atoms, from_instance), rel=1e-13)


def test_verlet_skin_gives_the_same_results_along_a_trajectory():
    # 27 waters (9.3 Å cell): no pair has two images within cutoff + skin (4.3 Å), so the graph,
    # and with it every result, is bit for bit the one of a search on every call.
    rebuilt, verlet = calculator(), calculator(skin=0.8)
    atoms = build_water_box(27, seed=5)
    rng = np.random.default_rng(1)
    for _ in range(8):
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape) + [0.05, 0.0, -0.03]
        for reference, ours in zip(*energy_forces_stress(atoms, rebuilt, verlet)):
            np.testing.assert_array_equal(ours, reference)
    assert rebuilt.graph_builder.searches == 8
    assert verlet.graph_builder.searches < 4


def test_recompute_gives_the_same_results_and_runs_blocks_twice():
    plain, recompute = calculator(), calculator(recompute=True)
    recompute.model.load_state_dict(plain.model.state_dict())
    atoms = build_water_box(8, seed=2)
    calls = []
    block = recompute.model.block
    attentions = list(recompute.model.attentions)
    recompute.model.block = lambda layers, *args: calls.append(attentions.index(layers[1])) or block(layers, *args)
    for reference, ours in zip(*energy_forces_stress(atoms, plain, recompute)):
        np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)
    blocks = recompute.model.config.num_blocks
    assert calls == list(range(blocks)) + list(reversed(range(blocks)))  # forward, then again backwards


def test_small_chunks_with_recompute_give_the_same_results():
    plain, chunked = calculator(), calculator(recompute=True, chunk_atoms=5)
    chunked.model.load_state_dict(plain.model.state_dict())
    atoms = build_water_box(8, seed=4)  # 24 atoms: five chunks, the last one short
    updates = []
    attention = chunked.model.attentions[0]
    update = attention.chunk_update
    attention.chunk_update = lambda *args: updates.append(args[2]) or update(*args)
    for reference, ours in zip(*energy_forces_stress(atoms, plain, chunked)):
        np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)
    first_pass = [(chunk.atoms.start, chunk.atoms.stop) for chunk in updates[:5]]
    assert first_pass == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]


def test_static_graph_matches_the_filtered_graph_between_and_across_searches():
    """The shape-stable graph a CUDA-graph replay needs: same results, pairs beyond the cutoff kept."""
    model = tiny_model().double()
    filtered = VerletGraphBuilder(CUTOFF, skin=0.8, dtype=torch.float64)
    static = VerletGraphBuilder(CUTOFF, skin=0.8, dtype=torch.float64)
    atoms = build_water_box(27, seed=5)
    rng = np.random.default_rng(1)
    built = []
    for _ in range(8):
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape) + [0.05, 0.0, -0.03]
        (graph, order), (static_graph, static_order, new) = filtered(atoms), static.static_graph(atoms)
        built.append((new, id(static_graph)))
        assert static_graph.num_edges > graph.num_edges
        ours = model(static_graph, compute_stress=True)
        reference = model(graph, compute_stress=True)
        assert ours["energy"].item() == pytest.approx(reference["energy"].item(), rel=1e-12)
        for name in ("forces", "stress"):
            a, b = ours[name].detach(), reference[name].detach()
            if name == "forces":
                a, b = a[np.argsort(static_order)], b[np.argsort(order)]
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert static.searches == filtered.searches >= 2
    assert [new for new, _ in built].count(True) == static.searches  # new pairs exactly at each search
    # One object throughout: searches refill it (padded to a fixed edge count), as a CUDA graph needs.
    assert static.static_builds == 1 and len({graph_id for _, graph_id in built}) == 1


def test_padding_edges_change_nothing_and_a_full_graph_is_replaced():
    from e2former_calc.neighbors import with_edge_capacity

    model = tiny_model().double()
    atoms = build_water_box(8, seed=2)
    builder = VerletGraphBuilder(CUTOFF, skin=0.5, dtype=torch.float64)
    graph, _ = builder(atoms)
    padded = with_edge_capacity(graph, graph.num_edges + 2 * graph.num_atoms + 5, np.array([0.0, 3.0, 0.0]))
    assert padded.row_ptr.diff().min() >= graph.row_ptr.diff().min() + 2  # spread over the atoms
    reference, ours = model(graph, compute_stress=True), model(padded, compute_stress=True)
    for name in ("energy", "forces", "stress"):
        torch.testing.assert_close(ours[name].detach(), reference[name].detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="capacity"):
        with_edge_capacity(graph, graph.num_edges - 1, np.array([0.0, 3.0, 0.0]))
    # A search that finds more pairs than the held graph has edges builds a new, larger one.
    static = VerletGraphBuilder(CUTOFF, skin=0.5, dtype=torch.float64)
    first, _, _ = static.static_graph(atoms)
    squeezed = atoms.copy()
    squeezed.set_cell(atoms.cell * 0.9, scale_atoms=True)
    second, _, new = static.static_graph(squeezed)
    assert new and second is not first and second.num_edges > first.num_edges and static.static_builds == 2


def test_md_acceleration_defaults():
    from e2former_calc.calculator import md_acceleration

    assert md_acceleration("cpu") == (1.0, False)  # eager: a wide skin, fewer searches
    assert md_acceleration("cpu", skin=0.3) == (0.3, False)
    assert md_acceleration("cpu", cuda_graph="on") == (0.5, True)  # a captured graph wants few idle pairs
    assert md_acceleration("cpu", skin=0.0, cuda_graph="off") == (0.0, False)
    with pytest.raises(ValueError, match="cuda_graph"):
        md_acceleration("cpu", cuda_graph="yes")


@pytest.mark.parametrize("enable", [
    "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "torch.backends.cuda.matmul.allow_tf32 = True",
    "torch.set_float32_matmul_precision('high')",
])
def test_reduced_matmul_precision_is_seen_whichever_way_it_was_set(enable):
    """In a fresh interpreter each: mixing PyTorch's legacy and new precision flags leaves a process
    where reading the legacy one raises, which must not leak into other tests."""
    import subprocess
    import sys

    script = f"""
import torch
from e2former_calc.calculator import reduced_matmul_precision
cuda, cpu = torch.device("cuda"), torch.device("cpu")
assert reduced_matmul_precision(cuda, torch.float32) is None
{enable}
assert reduced_matmul_precision(cuda, torch.float32) == "tf32"
assert reduced_matmul_precision(cuda, torch.float64) is None  # float64 products never use TF32
assert reduced_matmul_precision(cpu, torch.float32) is None
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_reduced_matmul_precision_is_warned_about_once(monkeypatch):
    from e2former_calc import calculator as calculator_module

    monkeypatch.setattr(calculator_module, "reduced_matmul_precision", lambda device, dtype: "tf32")
    atoms = molecule("H2O")
    atoms.calc = calculator()
    with pytest.warns(UserWarning, match="float32 matrix products run in tf32"):
        atoms.get_forces()
    atoms.positions[0, 0] += 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atoms.get_forces()  # once per calculator
