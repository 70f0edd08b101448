"""Compiled Triton kernels and the model on CUDA against the PyTorch reference.

These run only where CUDA is present (the lent GPU machine); CI has none and skips them.
The interpreter tests in test_neighbor_attention.py cover the same kernels on the CPU.
The kernel tests need only torch and Triton; the model test also needs ase and vesin.
"""

import pytest
import torch

from e2former_calc.kernels.neighbor_attention import CONFIG_ENV, neighbor_attention, transpose_neighbors
from test_neighbor_attention import place_edges_at_the_cutoff

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLOAT_INPUTS = ["query", "key", "value", "edge_vector", "logit_scale", "logit_bias", "value_weight"]


def random_problem(num_nodes, max_degree, heads, head_dim, value_dim, cutoff, seed):
    """Float64 CPU inputs on a random CSR graph whose first 7 atoms have no neighbours."""
    generator = torch.Generator().manual_seed(seed)
    degree = torch.randint(0, max_degree + 1, (num_nodes,), generator=generator)
    degree[:7] = 0
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), degree.cumsum(0)])
    num_edges = int(degree.sum())
    source_index = torch.randint(0, num_nodes, (num_edges,), generator=generator)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    direction = randn(num_edges, 3)
    length = 0.5 + (cutoff - 0.6) * torch.rand(num_edges, 1, generator=generator, dtype=torch.float64)
    floats = {
        "query": randn(num_nodes, heads, head_dim),
        "key": randn(num_nodes, heads, head_dim),
        "value": randn(num_nodes, heads, value_dim),
        "edge_vector": direction / direction.norm(dim=1, keepdim=True) * length,
        "logit_scale": 1 + 0.3 * randn(num_edges, heads),
        "logit_bias": randn(num_edges, heads),
        "value_weight": 1 + 0.3 * randn(num_edges, heads),
    }
    return floats, row_ptr, source_index


def kernel_and_reference(floats, row_ptr, source_index, cutoff, payload, dtype, seed=0, transpose=None):
    """[out, 7 gradients] on CUDA for the same inputs and output gradient, keyed by run:
    True (kernel, `dtype`), False (reference, `dtype`) and "exact" (reference, float64)."""
    row_ptr, source_index = row_ptr.cuda(), source_index.cuda()
    generator = torch.Generator().manual_seed(seed)
    grad_out = None
    results = {}
    for run, run_dtype in ((False, dtype), (True, dtype), ("exact", torch.float64)):
        tensors = {k: v.to("cuda", run_dtype).requires_grad_(True) for k, v in floats.items()}
        out = neighbor_attention(**tensors, row_ptr=row_ptr, source_index=source_index, cutoff=cutoff,
                                 payload=payload, use_kernel=run is True, transpose=transpose)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).cuda()
        grads = torch.autograd.grad(out, list(tensors.values()), grad_out.to(run_dtype))
        results[run] = [out.detach()] + list(grads)
    return results


def assert_close_to_reference(results, dtype):
    """float64: kernel == reference to 1e-10. float32: the kernel's relative error from the float64
    result is at most that of the float32 reference, within a factor 3 (gradients wrt short edge
    vectors are ill-conditioned: there the float32 reference itself is only ~2e-4 accurate)."""
    names = ["out"] + FLOAT_INPUTS
    for name, reference, kernel, exact in zip(names, results[False], results[True], results["exact"]):
        assert kernel.dtype == dtype

        def error(value, truth):
            return ((value.double() - truth).norm() / truth.norm().clamp(min=1e-30)).item()

        if dtype == torch.float64:
            assert error(kernel, reference) < 1e-10, f"{name}: relative error {error(kernel, reference):.2e}"
        else:
            allowed = max(2e-5, 3 * error(reference, exact))
            assert error(kernel, exact) < allowed, f"{name}: relative error {error(kernel, exact):.2e} > {allowed:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("payload", ["direction", "inverse_distance"])
@pytest.mark.parametrize(
    "heads,head_dim,value_dim",
    [(4, 8, 18), (16, 16, 64), (3, 5, 29), (16, 8, 36), (128, 8, 18), (8, 16, 144)],  # incl. the model's shapes
)
def test_kernel_matches_reference_forward_and_gradients(dtype, payload, heads, head_dim, value_dim):
    floats, row_ptr, source_index = random_problem(300, 40, heads, head_dim, value_dim, 5.0, seed=heads * 1000 + value_dim)
    assert_close_to_reference(kernel_and_reference(floats, row_ptr, source_index, 5.0, payload, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("payload", ["direction", "inverse_distance"])
@pytest.mark.parametrize("override", ["16x8", "16x4", "64x4", "128x8", "32x2", "forward=128x4,edge=64x2x2,target=16x2,source=64x8"])
def test_kernel_launch_configurations_match_reference(monkeypatch, override, payload, dtype):
    """Several atoms per program, atoms straddling programs (5 heads), the fallback 16x8."""
    monkeypatch.setenv(CONFIG_ENV, override)
    floats, row_ptr, source_index = random_problem(200, 30, 5, 8, 20, 5.0, seed=11)
    assert_close_to_reference(kernel_and_reference(floats, row_ptr, source_index, 5.0, payload, dtype), dtype)


@pytest.mark.parametrize("payload", ["direction", "inverse_distance"])
def test_float32_edges_at_the_cutoff_with_large_logits(payload):
    """The compiled kernels where training once diverged (test_neighbor_attention has the story)."""
    floats, row_ptr, source_index = random_problem(200, 12, 4, 8, 16, 5.0, seed=5)
    place_edges_at_the_cutoff(floats, 5.0)
    results = kernel_and_reference(floats, row_ptr, source_index, 5.0, payload, torch.float32)
    for name, kernel, reference, exact in zip(["out"] + FLOAT_INPUTS, results[True], results[False], results["exact"]):
        assert torch.isfinite(kernel).all() and torch.isfinite(reference).all(), name
    assert_close_to_reference(results, torch.float32)


def test_backward_is_deterministic_with_a_cached_transpose():
    floats, row_ptr, source_index = random_problem(500, 40, 16, 16, 64, 5.0, seed=3)
    transpose = transpose_neighbors(row_ptr.cuda(), source_index.cuda())
    first, again = (kernel_and_reference(floats, row_ptr, source_index, 5.0, "direction", torch.float32,
                                         transpose=transpose)[True] for _ in range(2))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_on_cuda_with_kernel_matches_cpu_reference(dtype):
    pytest.importorskip("ase")
    pytest.importorskip("vesin")
    from ase.build import molecule

    from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
    from e2former_calc.neighbors import build_graph
    from e2former_calc.water import build_water_box

    torch.manual_seed(0)
    config = E2FormerConfig(species=(1, 6, 8), channels=32, num_blocks=2, num_heads=8, cutoff=4.5)
    model = E2FormerV2(config).to(dtype)
    systems = [build_water_box(16), molecule("CH3CH2OH")]
    cpu = model(build_graph(systems, config.cutoff, dtype=dtype), compute_stress=False)
    model.cuda()
    gpu = model(build_graph(systems, config.cutoff, dtype=dtype, device="cuda"))
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    for name in ("energy", "forces"):
        error = (gpu[name].cpu() - cpu[name]).norm() / cpu[name].norm()
        assert error < tolerance, f"{name}: relative error {error:.2e}"


def shipped_weights(zbl: bool):
    """The shipped water weights with the ZBL repulsion on or off (the network unchanged)."""
    from e2former_calc.checkpoint import load_model
    from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2

    shipped = load_model("e2former-v2-water-s", "cpu", torch.float64)
    model = E2FormerV2(E2FormerConfig.from_dict({**shipped.config.to_dict(), "zbl": zbl}))
    model.load_state_dict(shipped.state_dict())
    return model


@pytest.mark.parametrize("zbl", [False, True])
@pytest.mark.parametrize("mode", ["conservative", "direct"])
def test_cuda_graph_calculator_matches_eager_along_a_trajectory(mode, zbl):
    """Captures at each neighbour search, replays in between: same energies, forces and stress."""
    pytest.importorskip("ase")
    pytest.importorskip("vesin")
    import numpy as np

    from e2former_calc import E2FormerCalculator
    from e2former_calc.water import build_water_box

    model = shipped_weights(zbl)
    eager = E2FormerCalculator(model, device="cuda", dtype="float64", mode=mode, skin=0.6)
    graphed = E2FormerCalculator(model, device="cuda", dtype="float64", mode=mode, skin=0.6, cuda_graph=True)
    atoms = build_water_box(27, seed=3)
    if zbl:  # one hydrogen pushed to 0.75 Å from its oxygen, inside the repulsion's range
        bond = atoms.positions[1] - atoms.positions[0]
        atoms.positions[1] = atoms.positions[0] + 0.75 * bond / np.linalg.norm(bond)
    rng = np.random.default_rng(0)
    for _ in range(12):
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape) + [0.04, 0.0, -0.02]
        results = []
        for calc in (eager, graphed):
            atoms.calc = calc
            properties = [atoms.get_potential_energy(), atoms.get_forces()]
            if mode == "conservative":
                properties.append(atoms.get_stress())
            results.append(properties)
        for reference, ours in zip(*results):
            np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-9)
    assert graphed.graph_builder.searches >= 2
    assert graphed.captured.captures == graphed.graph_builder.static_builds == 1  # searches refill the captured graph


def test_model_inference_in_target_chunks_matches_one_pass_on_cuda():
    pytest.importorskip("ase")
    pytest.importorskip("vesin")
    from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
    from e2former_calc.neighbors import build_graph
    from e2former_calc.water import build_water_box

    torch.manual_seed(0)
    model = E2FormerV2(E2FormerConfig(species=(1, 8), channels=32, num_blocks=2, num_heads=8, cutoff=4.5)).double().cuda()
    graph = build_graph([build_water_box(16)], 4.5, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        whole = model(graph, mode="direct")
        model.chunk_atoms = 10
        chunked = model(graph, mode="direct")
    for name in ("energy", "forces"):
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-10, atol=1e-10)
