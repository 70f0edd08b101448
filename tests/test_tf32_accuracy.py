"""benchmarks/tf32_accuracy.py rounds matrix factors to TF32 exactly as the hardware's conversion does."""

import torch

from benchmarks.tf32_accuracy import EmulatedTF32, round_to_tf32


def test_rounds_to_ten_mantissa_bits_nearest_ties_away():
    unit = 2.0**-10  # TF32's last mantissa bit at 1.0
    values = torch.tensor([1.0, 1 + unit, 1 + unit / 4, 1 + unit / 2, 1 + 3 * unit / 4, -(1 + unit / 2), 3.0e-3])
    expected = torch.tensor([1.0, 1 + unit, 1.0, 1 + unit, 1 + unit, -(1 + unit), 1573 * 2.0**-19])  # 3e-3 = 1572.86 units of 2^-19
    assert torch.equal(round_to_tf32(values), expected)


def test_rounds_the_factors_of_products_with_a_large_enough_inner_dimension():
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 32, generator=generator), torch.randn(32, 5, generator=generator)
    narrow = torch.randn(4, 3, generator=generator), torch.randn(3, 5, generator=generator)
    with EmulatedTF32(min_inner=16):
        wide_product, narrow_product = wide[0] @ wide[1], narrow[0] @ narrow[1]
    assert torch.equal(wide_product, round_to_tf32(wide[0]) @ round_to_tf32(wide[1]))
    assert not torch.equal(wide_product, wide[0] @ wide[1])
    assert torch.equal(narrow_product, narrow[0] @ narrow[1])


def test_edge_vectors_and_strain_are_immune_to_tf32():
    """The geometric products (cell shifts, strained positions and cell) are computed elementwise,
    so allowing TF32 for matrix products leaves them bit-identical (a matrix product would round
    a 12 Å cell to ~0.01 Å)."""
    from ase.build import molecule

    from e2former_calc.models.graph import geometric_matmul
    from e2former_calc.neighbors import build_graph

    atoms = molecule("H2O")
    atoms.set_cell([12.3456, 11.9876, 12.5432])
    atoms.pbc = True
    atoms.positions += [6.1, 5.9, 0.3]  # near a face: edges to periodic images
    graph = build_graph([atoms], cutoff=6.0)
    assert bool((graph.cell_shift != 0).any())
    strain = torch.tensor([[[1e-3, 2e-4, 0.0], [2e-4, -5e-4, 3e-4], [0.0, 3e-4, 7e-4]]])

    def geometry():
        strained_positions = geometric_matmul(graph.positions.unsqueeze(1), strain[graph.system_index])
        return graph.edge_vectors(), geometric_matmul(graph.cell, strain), strained_positions

    exact = geometry()
    with EmulatedTF32():
        emulated = geometry()
        assert not torch.equal(graph.cell @ strain, exact[1])  # a matrix product would be rounded
    for value, reference in zip(emulated, exact):
        assert torch.equal(value, reference)
    assert torch.allclose(exact[1], graph.cell @ strain, rtol=1e-6, atol=0)
