"""Neighbour attention: the PyTorch reference against the formula, the Triton kernel against the reference.

Kernel tests (``test_kernel_*``) need Triton's CPU interpreter, which is chosen when a kernel is
decorated, i.e. when the module is first imported. So that other test files in the same pytest
process are not affected, ``test_interpreted_kernel_suite`` runs them in a subprocess with
TRITON_INTERPRET=1; in this process they are skipped (and run directly if the whole run has
TRITON_INTERPRET=1).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from e2former_calc.kernels.neighbor_attention import (
    CONFIG_ENV,
    DEFAULT_CONFIGS,
    KERNELS,
    LaunchConfig,
    _default_config,
    _launch_config,
    _parse_config_override,
    neighbor_attention,
    transpose_neighbors,
)
from e2former_calc.kernels.neighbor_attention_reference import envelope, neighbor_attention_reference

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

CUTOFF = 3.0
PAYLOADS = ["direction", "inverse_distance"]
FLOAT_INPUTS = ["query", "key", "value", "edge_vector", "logit_scale", "logit_bias", "value_weight"]
needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="run by test_interpreted_kernel_suite in a TRITON_INTERPRET=1 subprocess"
)


def random_graph(degrees, num_heads, head_dim, value_dim, dtype=torch.float64, seed=0, logit_spread=1.0):
    """Random inputs on a CSR graph whose target i has degrees[i] edges (random sources, |r| < CUTOFF)."""
    generator = torch.Generator().manual_seed(seed)
    degrees = torch.as_tensor(degrees)
    num_nodes, num_edges = degrees.numel(), int(degrees.sum())
    row_ptr = torch.zeros(num_nodes + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(degrees, 0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    direction = randn(num_edges, 3)
    length = 0.5 + (0.97 * CUTOFF - 0.5) * torch.rand(num_edges, 1, generator=generator, dtype=torch.float64)
    tensors = dict(
        query=randn(num_nodes, num_heads, head_dim),
        key=randn(num_nodes, num_heads, head_dim),
        value=randn(num_nodes, num_heads, value_dim),
        edge_vector=direction / direction.norm(dim=1, keepdim=True) * length,
        logit_scale=1.0 + 0.3 * randn(num_edges, num_heads),
        logit_bias=logit_spread * randn(num_edges, num_heads),
        value_weight=randn(num_edges, num_heads),
    )
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    tensors["row_ptr"] = row_ptr
    tensors["source_index"] = torch.randint(0, num_nodes, (num_edges,), generator=generator)
    return tensors


def call(function, graph, **kwargs):
    return function(*(graph[name] for name in FLOAT_INPUTS), graph["row_ptr"], graph["source_index"], CUTOFF, **kwargs)


def direct_attention(graph, payload, sink):
    """The formula written out with Python loops (no max shift, no scatter), float64."""
    q, k, v = graph["query"], graph["key"], graph["value"]
    num_nodes, num_heads, head_dim = q.shape
    width = 3 if payload == "direction" else 1
    out = torch.zeros(num_nodes, width, num_heads, v.shape[-1], dtype=torch.float64)
    for i in range(num_nodes):
        edges = range(int(graph["row_ptr"][i]), int(graph["row_ptr"][i + 1]))
        for h in range(num_heads):
            weights = []
            for e in edges:
                j = int(graph["source_index"][e])
                x = float(graph["edge_vector"][e].norm()) / CUTOFF
                envelope = 1 - 6 * x**5 + 15 * x**4 - 10 * x**3
                logit = graph["logit_scale"][e, h] * (q[i, h] @ k[j, h]) / math.sqrt(head_dim) + graph["logit_bias"][e, h]
                weights.append(envelope * math.exp(float(logit)))
            denominator = sink + sum(weights)
            for e, weight in zip(edges, weights):
                j = int(graph["source_index"][e])
                r = graph["edge_vector"][e]
                u = r / r.norm() if payload == "direction" else (1 / r.norm()).reshape(1)
                out[i, :, h, :] += weight / denominator * graph["value_weight"][e, h] * u[:, None] * v[j, h][None, :]
    return out


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("payload", PAYLOADS)
def test_reference_matches_direct_formula(payload):
    graph = random_graph([0, 3, 1, 4, 0, 2, 5], num_heads=3, head_dim=5, value_dim=4, seed=1)
    out = call(neighbor_attention_reference, graph, payload=payload, sink=0.05)
    expected = direct_attention(graph, payload, sink=0.05)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out[0].abs().max() == 0 and out[4].abs().max() == 0  # no neighbours -> 0
    assert out.abs().max() > 1e-2


@pytest.mark.parametrize("payload", PAYLOADS)
def test_reference_targets_may_be_a_chunk_of_the_atoms(payload):
    """Queries (and edges) of the first 4 targets only, keys and values of all 7 atoms: those rows of the whole."""
    graph = random_graph([0, 3, 1, 4, 0, 2, 5], num_heads=3, head_dim=5, value_dim=4, seed=3)
    whole = call(neighbor_attention_reference, graph, payload=payload)
    edges = int(graph["row_ptr"][4])
    chunk = dict(graph, query=graph["query"][:4], row_ptr=graph["row_ptr"][:5], source_index=graph["source_index"][:edges],
                 **{name: graph[name][:edges] for name in ("edge_vector", "logit_scale", "logit_bias", "value_weight")})
    torch.testing.assert_close(call(neighbor_attention_reference, chunk, payload=payload), whole[:4], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_reference_gradcheck_and_gradgradcheck(payload):
    graph = random_graph([2, 0, 3, 1], num_heads=2, head_dim=3, value_dim=2, seed=2)
    inputs = tuple(graph[name].requires_grad_() for name in FLOAT_INPUTS)

    def attention(*floats):
        return neighbor_attention_reference(*floats, graph["row_ptr"], graph["source_index"], CUTOFF, payload, 0.1)

    assert torch.autograd.gradcheck(attention, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(attention, inputs, fast_mode=True)


def test_reference_is_smooth_as_an_edge_reaches_the_cutoff():
    """Output and forces tend to their no-edge values like (1 - d/cutoff)^3 and ^2 (envelope order)."""
    graph = random_graph([4, 2, 3], num_heads=2, head_dim=4, value_dim=3, seed=3)
    without_edge = dict(graph)
    without_edge["row_ptr"] = graph["row_ptr"] - torch.tensor([0, 1, 1, 1])
    for name in ["logit_scale", "logit_bias", "value_weight", "source_index"]:
        without_edge[name] = graph[name][1:]
    without_edge["edge_vector"] = graph["edge_vector"][1:]
    out_without = call(neighbor_attention_reference, without_edge)

    output_gaps, force_sizes = [], []
    for gap in [1e-1, 1e-2, 1e-3]:
        edge_vector = graph["edge_vector"].clone()
        edge_vector[0] *= CUTOFF * (1 - gap) / edge_vector[0].norm()
        edge_vector.requires_grad_()
        out = call(neighbor_attention_reference, dict(graph, edge_vector=edge_vector))
        (grad,) = torch.autograd.grad(out.square().sum(), edge_vector)
        output_gaps.append(float((out - out_without).detach().abs().max()))
        force_sizes.append(float(grad[0].norm()))
    assert output_gaps[0] > 1e-6  # the edge matters away from the cutoff
    for coarse, fine in zip(output_gaps, output_gaps[1:]):
        assert 300 < coarse / fine < 3000  # ~ gap^3
    for coarse, fine in zip(force_sizes, force_sizes[1:]):
        assert 30 < coarse / fine < 300  # ~ gap^2


def test_envelope_is_smooth_at_cutoff():
    distance = torch.tensor([CUTOFF - 1e-6, CUTOFF, CUTOFF + 0.5], dtype=torch.float64, requires_grad=True)
    value = envelope(distance, CUTOFF)
    (gradient,) = torch.autograd.grad(value.sum(), distance)
    assert value[1] == 0 and value[2] == 0 and 0 < value[0] < 1e-15
    assert gradient.abs().max() < 1e-9


def test_envelope_keeps_its_relative_precision_up_to_the_cutoff():
    # The expanded polynomial 1 - 10x^3 + 15x^4 - 6x^5 cancels to float32 noise of 1e-7 here, where
    # p is 1e-9: off by a factor of 600 at 0.9996 cutoff, and zero or negative depending on rounding.
    distance = (torch.linspace(0.99, 0.9999, 1000, dtype=torch.float64) * CUTOFF).float()
    x = distance.double() / CUTOFF
    exact = (1 - x) ** 3 * (1 + 3 * x + 6 * x**2)
    single = envelope(distance, CUTOFF).double()
    assert (single > 0).all()
    torch.testing.assert_close(single, exact, rtol=5e-3, atol=0)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_reference_float32_is_stable_for_large_logits(payload):
    """exp(100) overflows float32: the per-target shift (including log sink) must absorb it."""
    graph = random_graph([3, 5, 0, 2], num_heads=2, head_dim=4, value_dim=3, seed=4, logit_spread=40.0)
    graph["logit_bias"] += 100.0
    expected = call(neighbor_attention_reference, graph, payload=payload)
    single = {name: t.float() if t.is_floating_point() else t for name, t in graph.items()}
    out = call(neighbor_attention_reference, single, payload=payload)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_dispatch_uses_reference_on_cpu_and_refuses_kernel_without_cuda():
    graph = random_graph([2, 1, 3], num_heads=2, head_dim=3, value_dim=2, seed=5)
    torch.testing.assert_close(call(neighbor_attention, graph), call(neighbor_attention_reference, graph), rtol=0, atol=0)
    if not INTERPRETING:
        with pytest.raises(RuntimeError, match="CUDA"):
            call(neighbor_attention, graph, use_kernel=True)


# ----------------------------------------------------------------------------- launch configuration


def test_config_override_parsing():
    assert _parse_config_override("") == {}
    assert _parse_config_override("32x4") == {name: LaunchConfig(32, 4) for name in KERNELS}
    assert _parse_config_override("forward=64x8, source=16x4") == {
        "forward": LaunchConfig(64, 8), "source": LaunchConfig(16, 4)
    }
    with pytest.raises(ValueError, match="unknown kernel"):
        _parse_config_override("backward=16x4")
    assert _parse_config_override("target=16x8x4") == {"target": LaunchConfig(16, 8, 4)}
    with pytest.raises(ValueError, match="powers of two"):
        _parse_config_override("24x4")
    with pytest.raises(ValueError, match="powers of two"):
        _parse_config_override("16x4x3")
    with pytest.raises(ValueError, match="ROWSxWARPS or ROWSxWARPSxEDGES"):
        _parse_config_override("16")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_configs_are_powers_of_two_and_grids_cover_every_row(kernel, payload, dtype):
    for num_heads, head_dim, value_dim in [(16, 16, 64), (128, 8, 18), (3, 5, 29), (8, 16, 144)]:
        grid, meta = _launch_config(kernel, 1001, num_heads, head_dim, value_dim, payload, dtype)
        rows = meta["BLOCK_R"]
        assert 8 <= rows <= 128 and rows & (rows - 1) == 0
        per_program = rows * (meta["EDGES_PER_STEP"] if kernel == "edge" else 1)  # edge: EDGES_PER_STEP tiles
        assert (grid[0] - 1) * per_program < 1001 * num_heads <= grid[0] * per_program
        assert meta["BLOCK_V"] >= value_dim and meta["BLOCK_D"] >= head_dim
    double, single = _default_config(kernel, payload, 64, 8), _default_config(kernel, payload, 64, 4)
    assert double.block_rows / double.num_warps <= single.block_rows / single.num_warps  # registers per thread
    assert _default_config(kernel, payload, 256, 4).block_rows <= _default_config(kernel, payload, 64, 4).block_rows


def test_default_table_covers_every_kernel_payload_and_precision():
    assert set(DEFAULT_CONFIGS) == {(k, p, size) for k in KERNELS for p in PAYLOADS for size in (4, 8)}


def test_config_environment_override_reaches_the_launch(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "source=128x2x4")
    grid, meta = _launch_config("source", 100, 4, 8, 8, "direction", torch.float32)
    assert (meta["BLOCK_R"], meta["num_warps"], meta["EDGES_PER_STEP"]) == (128, 2, 4) and grid == (4,)
    _, meta = _launch_config("forward", 100, 4, 8, 8, "direction", torch.float32)  # not overridden: the default
    assert (meta["BLOCK_R"], meta["num_warps"], meta["EDGES_PER_STEP"]) == _default_config("forward", "direction", 8, 4)
    monkeypatch.setenv(CONFIG_ENV, "edge=32x2x4")  # the edge kernel: 4 tiles of 32 (edge, head) rows per program
    grid, meta = _launch_config("edge", 100, 4, 8, 8, "direction", torch.float32)
    assert (meta["BLOCK_R"], meta["EDGES_PER_STEP"]) == (32, 4) and grid == (4,)
    monkeypatch.delenv(CONFIG_ENV)  # the lookup is cached: the same shape must not keep the override
    _, meta = _launch_config("source", 100, 4, 8, 8, "direction", torch.float32)
    assert (meta["BLOCK_R"], meta["num_warps"], meta["EDGES_PER_STEP"]) == _default_config("source", "direction", 8, 4)


# ----------------------------------------------------------------------------- kernel (interpreter)

KERNEL_DEGREES = [0, 3, 1, 4, 0, 2, 5, 1, 0, 3, 2, 6, 1, 1, 0, 2, 4, 3, 0, 1]  # 20 targets: two tiles


def assert_kernel_matches_reference(graph, payload, dtype):
    """Kernel output and all 7 input gradients equal the reference's (float64 1e-11, float32 1e-5)."""
    grad_out = None
    results = {}
    for use_kernel in (False, True):
        inputs = {name: graph[name].clone().requires_grad_() for name in FLOAT_INPUTS}
        out = call(neighbor_attention, dict(graph, **inputs), payload=payload, use_kernel=use_kernel)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
        results[use_kernel] = (out, *grads)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    for name, expected, got in zip(["out", *FLOAT_INPUTS], results[False], results[True]):
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, **tolerance, msg=lambda m: f"{name}: {m}")


@needs_interpreter
@pytest.mark.parametrize(
    "dtype, payload, num_heads, head_dim, value_dim",
    [  # every (dtype, payload) pair, every shape twice; 3, 5, 6 and 20 are not powers of two
        (torch.float64, "direction", 1, 4, 8),
        (torch.float32, "inverse_distance", 1, 4, 8),
        (torch.float32, "direction", 3, 5, 6),
        (torch.float64, "inverse_distance", 3, 5, 6),
        (torch.float64, "direction", 2, 16, 20),
        (torch.float32, "inverse_distance", 2, 16, 20),
    ],
)
def test_kernel_matches_reference_with_gradients(dtype, payload, num_heads, head_dim, value_dim):
    graph = random_graph(KERNEL_DEGREES, num_heads, head_dim, value_dim, dtype=dtype, seed=6)
    assert_kernel_matches_reference(graph, payload, dtype)


# 13 atoms, the first 7 without neighbours: with 5 heads the first 16-row tile has no edge at all,
# and atoms straddle tiles of 16, 32 or 64 (atom, head) rows.
CONFIG_DEGREES = [0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 7, 2, 3]


@needs_interpreter
@pytest.mark.parametrize(
    "override, dtype, payload",
    [
        ("16x8", torch.float32, "direction"),  # the fallback configuration
        ("64x4", torch.float64, "direction"),  # several atoms (all their heads) per program
        ("32x2", torch.float64, "inverse_distance"),
        ("forward=64x4,target=16x2,source=128x8", torch.float32, "inverse_distance"),
        ("32x4x2", torch.float64, "direction"),  # two neighbour steps per loop iteration
        ("forward=16x8x4,edge=16x4x4,target=64x4x2,source=32x2x4", torch.float64, "inverse_distance"),
    ],
)
def test_kernel_launch_configurations_match_reference(monkeypatch, override, dtype, payload):
    monkeypatch.setenv(CONFIG_ENV, override)
    graph = random_graph(CONFIG_DEGREES, num_heads=5, head_dim=3, value_dim=7, dtype=dtype, seed=10)
    assert_kernel_matches_reference(graph, payload, dtype)


@needs_interpreter
def test_kernel_float32_online_softmax_is_stable_for_large_logits():
    graph = random_graph(KERNEL_DEGREES, 2, 4, 3, seed=8, logit_spread=40.0)
    graph["logit_bias"] += 100.0
    expected = call(neighbor_attention_reference, graph)
    single = {name: t.float() if t.is_floating_point() else t for name, t in graph.items()}
    out = call(neighbor_attention, single, use_kernel=True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def place_edges_at_the_cutoff(tensors, cutoff):
    """Edges 0 and 6 to |r| = 0.9996 cutoff with logit 21, edge 3 to |r| = cutoff with logit 120 (in place)."""
    for edge, (fraction, logit) in {0: (0.9996, 21.0), 3: (1.0, 120.0), 6: (0.9996, 21.0)}.items():
        vector = tensors["edge_vector"][edge]
        tensors["edge_vector"][edge] = vector / vector.norm() * fraction * cutoff
        tensors["logit_scale"][edge] = 0.0
        tensors["logit_bias"][edge] = logit


@needs_interpreter
def test_kernel_float32_is_exact_for_edges_at_the_cutoff_with_large_logits():
    """Edges near (|r| = 0.9996 cutoff, p ~ 1e-9) and at the cutoff (p = 0) with logits of 21 and 120.

    The first one's weight p e^s is of order one: it needs p to full relative precision. The second
    one's e^(s - lse) overflows float32, and 0 x inf must not turn its gradients into NaN (training
    diverged on an H200 this way, from a 54-atom water cluster)."""
    graph = random_graph([3, 2, 1, 2], num_heads=2, head_dim=4, value_dim=3, seed=11)
    place_edges_at_the_cutoff(graph, CUTOFF)
    grad_out = torch.randn(call(neighbor_attention_reference, graph).shape, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64)
    results = {}
    for dtype, use_kernel in ((torch.float64, False), (torch.float32, True)):
        inputs = {name: graph[name].to(dtype).requires_grad_() for name in FLOAT_INPUTS}
        out = call(neighbor_attention, dict(graph, **inputs), use_kernel=use_kernel)
        results[dtype] = (out, *torch.autograd.grad(out, list(inputs.values()), grad_out.to(dtype)))
    for name, expected, got in zip(["out", *FLOAT_INPUTS], results[torch.float64], results[torch.float32]):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=2e-4, msg=lambda m: f"{name}: {m}")


@needs_interpreter
def test_kernel_backward_is_deterministic_and_accepts_a_cached_transpose():
    graph = random_graph(KERNEL_DEGREES, 2, 3, 5, dtype=torch.float32, seed=9)
    transpose = transpose_neighbors(graph["row_ptr"], graph["source_index"])
    runs = []
    for cached in (None, transpose, transpose):
        inputs = {name: graph[name].clone().requires_grad_() for name in FLOAT_INPUTS}
        out = call(neighbor_attention, dict(graph, **inputs), use_kernel=True, transpose=cached)
        runs.append(torch.autograd.grad(out.sin().sum(), list(inputs.values())))
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert torch.equal(first, again)


def test_interpreted_kernel_suite():
    if INTERPRETING:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_kernel_", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary
