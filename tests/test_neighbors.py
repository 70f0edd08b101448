"""Atoms -> AtomicGraph: neighbour pairs and edge vectors against ase.neighborlist."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list

from e2former_calc.neighbors import VerletGraphBuilder, build_graph, read_charge_spin, spatial_order
from e2former_calc.water import build_water_box

CUTOFF = 3.0


def random_atoms(n, cell, pbc, seed):
    rng = np.random.default_rng(seed)
    cell = np.asarray(cell, dtype=float)
    positions = rng.uniform(-0.3, 1.3, size=(n, 3)) @ np.where(np.linalg.norm(cell, axis=1)[:, None] > 0, cell, np.eye(3) * 4)
    return Atoms(numbers=rng.choice([1, 8], size=n), positions=positions, cell=cell, pbc=pbc)


CASES = {
    "molecule": molecule("CH3CH2OH"),
    "small_cubic": random_atoms(3, np.eye(3) * 2.2, True, 0),  # cell < cutoff: many images
    "triclinic": random_atoms(6, [[4.0, 0, 0], [1.3, 3.5, 0], [0.7, -0.9, 3.8]], True, 1),
    "mixed_pbc_zero_vector": random_atoms(5, [[3.1, 0, 0], [0.4, 2.9, 0], [0, 0, 0]], [True, True, False], 2),
    "mixed_pbc_one_axis": random_atoms(5, [[2.5, 0, 0], [0, 6.0, 0], [0, 0, 6.0]], [True, False, False], 3),
    "bulk_si_primitive": bulk("Si", "diamond", a=5.43),
}


def graph_edges(graph):
    """Target and source (graph numbering) and edge vectors [E, 3] as numpy arrays."""
    counts = (graph.row_ptr[1:] - graph.row_ptr[:-1]).numpy()
    target = np.repeat(np.arange(graph.num_atoms), counts)
    source = graph.source_index.numpy()
    return target, source, graph.edge_vectors().numpy()


def canonical(target, source, vectors):
    """Edges as a lexicographically sorted [E, 5] array, vectors rounded to 1e-6 Å."""
    rows = np.column_stack([target, source, np.round(vectors, 6)])
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("name", sorted(CASES))
def test_edges_match_ase(name):
    atoms = CASES[name]
    graph = build_graph([atoms], CUTOFF, dtype=torch.float64)
    i, j, distance_vectors = neighbor_list("ijD", atoms, CUTOFF)
    assert graph.num_edges == len(i) > 0
    ours = canonical(*graph_edges(graph))
    reference = canonical(i, j, distance_vectors)
    np.testing.assert_array_equal(ours[:, :2], reference[:, :2])
    np.testing.assert_allclose(ours[:, 2:], reference[:, 2:], atol=2e-6)


def test_csr_sorted_by_target_and_shifts_are_integers():
    graph = build_graph([CASES["small_cubic"]], CUTOFF, dtype=torch.float64)
    counts = graph.row_ptr[1:] - graph.row_ptr[:-1]
    assert graph.row_ptr[0] == 0 and graph.row_ptr[-1] == graph.num_edges and (counts >= 0).all()
    assert torch.equal(graph.cell_shift, graph.cell_shift.round())
    assert graph.cell_shift.abs().max() >= 2  # a 2.2 Å cell with a 3 Å cutoff needs far images


def test_batch_offsets_and_atom_order():
    systems = [CASES["molecule"], CASES["triclinic"], build_water_box(4, seed=3)]
    orders = [spatial_order(atoms) for atoms in systems]
    graph = build_graph(systems, CUTOFF, dtype=torch.float64, atom_order=orders)
    assert graph.num_systems == 3 and graph.num_atoms == sum(len(a) for a in systems)
    target, source, vectors = graph_edges(graph)
    start = 0
    for system, (atoms, order) in enumerate(zip(systems, orders)):
        assert sorted(order.tolist()) == list(range(len(atoms)))
        in_system = slice(start, start + len(atoms))
        np.testing.assert_array_equal(graph.atomic_numbers[in_system].numpy(), atoms.numbers[order])
        assert (graph.system_index[in_system] == system).all()
        edges = (target >= start) & (target < start + len(atoms))
        assert ((source[edges] >= start) & (source[edges] < start + len(atoms))).all()
        # graph atom start + k is atoms[order[k]]
        ours = canonical(order[target[edges] - start], order[source[edges] - start], vectors[edges])
        reference = canonical(*neighbor_list("ijD", atoms, CUTOFF))
        np.testing.assert_array_equal(ours[:, :2], reference[:, :2])
        np.testing.assert_allclose(ours[:, 2:], reference[:, 2:], atol=2e-6)
        start += len(atoms)


def test_spatial_order_is_a_local_permutation():
    atoms = build_water_box(27, seed=1)
    order = spatial_order(atoms)
    assert sorted(order.tolist()) == list(range(len(atoms)))
    positions = atoms.get_positions()
    step = lambda p: np.linalg.norm(np.diff(p, axis=0), axis=1).mean()
    # Consecutive atoms in Morton order are much closer than in a random order.
    shuffled = np.random.default_rng(0).permutation(len(atoms))
    assert step(positions[order]) < 0.6 * step(positions[shuffled])


def test_wrapping_and_translation_do_not_change_edges():
    atoms = CASES["triclinic"]
    moved = atoms.copy()
    moved.positions += np.array([2, -3, 1]) @ atoms.cell.array + 0.37  # lattice shift + translation
    edges = canonical(*graph_edges(build_graph([atoms], CUTOFF, torch.float64)))
    moved_edges = canonical(*graph_edges(build_graph([moved], CUTOFF, torch.float64)))
    np.testing.assert_allclose(edges, moved_edges, atol=1e-9)


def test_graph_positions_are_centred_and_dtype_follows():
    graph = build_graph([CASES["molecule"]], CUTOFF, dtype=torch.float32)
    assert graph.positions.dtype == graph.cell.dtype == graph.cell_shift.dtype == torch.float32
    assert graph.source_index.dtype == graph.row_ptr.dtype == torch.long
    np.testing.assert_allclose(graph.positions.double().mean(0).numpy(), 0, atol=1e-6)


@pytest.mark.parametrize(
    "atoms, message",
    [
        (Atoms(), "empty"),
        (Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]]), "NaN or inf"),
        (Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]], pbc=True), "cell vector there is zero"),
        (Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]], cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]], pbc=True), "degenerate"),
    ],
)
def test_bad_atoms_are_refused(atoms, message):
    with pytest.raises(ValueError, match=message):
        build_graph([atoms], CUTOFF)


def test_charge_and_spin_are_read_and_checked():
    atoms = molecule("H2O")
    assert read_charge_spin(atoms) == (0, 1)
    atoms.info.update(charge=np.int64(-1), spin=2.0)
    assert read_charge_spin(atoms) == (-1, 2)
    graph = build_graph([atoms], CUTOFF)
    assert graph.charge.tolist() == [-1] and graph.spin.tolist() == [2]
    atoms.info["charge"] = 0.5
    with pytest.raises(ValueError, match=r'info\["charge"\] must be an integer'):
        read_charge_spin(atoms)
    atoms.info.update(charge=0, spin=0)
    with pytest.raises(ValueError, match="multiplicity 2S\\+1 and must be at least 1"):
        read_charge_spin(atoms)


GRAPH_FIELDS = ("positions", "atomic_numbers", "system_index", "cell", "row_ptr", "source_index", "cell_shift",
                "charge", "spin")


def assert_same_graph(graph, reference):
    for name in GRAPH_FIELDS:
        ours, theirs = getattr(graph, name), getattr(reference, name)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name


def random_walk(atoms, steps, seed, step_size=0.02, drift=(0.03, 0.0, -0.02)):
    """Copies of `atoms` along a random walk that also carries every atom across the cell walls."""
    rng = np.random.default_rng(seed)
    moved = atoms.copy()
    for _ in range(steps):
        moved.positions += rng.normal(scale=step_size, size=moved.positions.shape) + drift
        yield moved.copy()


@pytest.mark.parametrize("skin", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("spatial_sort", [True, False])
def test_verlet_list_gives_the_rebuilt_graph(skin, spatial_sort):
    # 27 waters (9.3 Å cell): no pair has two images within cutoff + skin, so the graphs must
    # be identical tensor for tensor, along a walk that needs several searches.
    builder = VerletGraphBuilder(CUTOFF, skin, torch.float32, spatial_sort=spatial_sort)
    frames = list(random_walk(build_water_box(27, seed=2), steps=40, seed=0))
    for atoms in frames:
        graph, order = builder(atoms)
        expected_order = spatial_order(atoms) if spatial_sort else np.arange(len(atoms))
        np.testing.assert_array_equal(order, expected_order)
        assert_same_graph(graph, build_graph([atoms], CUTOFF, torch.float32, atom_order=[order]))
    if skin == 0:
        assert builder.searches == len(frames)
    else:
        assert 1 < builder.searches < len(frames) / 3


@pytest.mark.parametrize("name", sorted(CASES))
def test_verlet_list_finds_every_pair_in_small_and_mixed_cells(name):
    # Cells thinner than 2 (cutoff + skin) hold several images of a pair: the edges then match
    # ASE as a set (their order may differ from a fresh search).
    builder = VerletGraphBuilder(CUTOFF, 0.8, torch.float64)
    for atoms in random_walk(CASES[name], steps=12, seed=1):
        graph, order = builder(atoms)
        target, source, vectors = graph_edges(graph)
        ours = canonical(order[target], order[source], vectors)
        reference = canonical(*neighbor_list("ijD", atoms, CUTOFF))
        np.testing.assert_array_equal(ours[:, :2], reference[:, :2])
        np.testing.assert_allclose(ours[:, 2:], reference[:, 2:], atol=2e-6)
    assert builder.searches < 12


def test_verlet_list_searches_again_when_the_system_changes():
    atoms = build_water_box(8, seed=4)
    builder = VerletGraphBuilder(CUTOFF, 1.0)
    builder(atoms)
    builder(atoms)
    assert builder.searches == 1
    strained = atoms.copy()
    strained.set_cell(atoms.cell.array * 1.01, scale_atoms=True)
    other_element = atoms.copy()
    other_element.numbers[1] = 8
    charged = atoms.copy()
    charged.info["charge"] = 1
    moved = atoms.copy()
    moved.positions[5] += [0.51, 0, 0]  # more than skin / 2
    for changed in (strained, other_element, charged, moved):
        searches = builder.searches
        graph, order = builder(changed)
        assert builder.searches == searches + 1
        assert_same_graph(graph, build_graph([changed], CUTOFF, atom_order=[order]))
    with pytest.raises(ValueError, match="skin must be zero or positive"):
        VerletGraphBuilder(CUTOFF, -0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("skin", [0.0, 1.0])
def test_verlet_list_on_cuda_gives_the_cpu_graph(skin):
    builder = VerletGraphBuilder(CUTOFF, skin, torch.float32, device="cuda")
    for atoms in random_walk(build_water_box(27, seed=2), steps=20, seed=0):
        graph, order = builder(atoms)
        assert graph.positions.is_cuda and graph.source_index.is_cuda
        assert_same_graph(graph.to(device="cpu"), build_graph([atoms], CUTOFF, torch.float32, atom_order=[order]))
