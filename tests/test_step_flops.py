"""benchmarks/step_flops.py counts matrix-product FLOPs (backward included) and operand bytes, and fits them per atom and edge."""

import pytest
import torch

from benchmarks.step_flops import StepWork, fit


def test_counts_a_product_and_its_input_gradient():
    weight = torch.randn(8, 5)
    inputs = torch.randn(3, 8, requires_grad=True)

    def step():  # forward 3x8 @ 8x5, backward 3x5 @ 5x8 for the input's gradient only
        return torch.autograd.grad((inputs @ weight).sum(), inputs)

    with StepWork() as work:
        step()
    assert work.flops == 2 * (2 * 3 * 8 * 5)


def test_fit_recovers_per_atom_and_per_edge_work():
    rows = [{"num_atoms": n, "num_edges": e, "flops": 7e6 * n + 3e4 * e} for n, e in ((128, 4022), (384, 14600), (1000, 42410))]
    fitted = fit(rows, "flops")
    assert fitted["per_atom"] == pytest.approx(7e6)
    assert fitted["per_edge"] == pytest.approx(3e4)
    assert fitted["worst_relative_misfit"] < 1e-9
    assert fitted["at_10k"] == pytest.approx(7e6 * 10_000 + 3e4 * 485_806)


def test_counts_bytes_of_operators_but_not_of_views():
    x = torch.randn(100, 10)
    with StepWork() as work:
        y = x.t()  # a view: no traffic
        z = x * 2.0  # reads 4000 bytes, writes 4000
    assert work.bytes == 8000 and work.flops == 0
    assert y.shape == (10, 100) and z.shape == x.shape
