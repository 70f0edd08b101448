"""Compiled Triton kernels and the model on CUDA against the PyTorch reference.

These run only where CUDA is present (the lent GPU machine); CI has none and skips them.
The interpreter tests in test_neighbor_attention.py cover the same kernels on the CPU.
"""

import pytest
import torch
from ase.build import molecule

from e2former_calc.kernels.neighbor_attention import neighbor_attention
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
from e2former_calc.neighbors import build_graph
from e2former_calc.water import build_water_box

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_graph(num_nodes, max_degree, generator):
    degree = torch.randint(0, max_degree + 1, (num_nodes,), generator=generator)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), degree.cumsum(0)])
    source_index = torch.randint(0, num_nodes, (int(degree.sum()),), generator=generator)
    return row_ptr, source_index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("payload", ["direction", "inverse_distance"])
@pytest.mark.parametrize("heads,head_dim,value_dim", [(4, 8, 18), (16, 16, 64), (3, 5, 29)])
def test_kernel_matches_reference_forward_and_gradients(dtype, payload, heads, head_dim, value_dim):
    generator = torch.Generator().manual_seed(heads * 1000 + value_dim)
    num_nodes, cutoff = 300, 5.0
    row_ptr, source_index = random_graph(num_nodes, 40, generator)
    num_edges = source_index.numel()
    direction = torch.randn(num_edges, 3, generator=generator, dtype=torch.float64)
    length = 0.5 + (cutoff - 0.6) * torch.rand(num_edges, 1, generator=generator, dtype=torch.float64)
    inputs = {
        "query": torch.randn(num_nodes, heads, head_dim, generator=generator, dtype=torch.float64),
        "key": torch.randn(num_nodes, heads, head_dim, generator=generator, dtype=torch.float64),
        "value": torch.randn(num_nodes, heads, value_dim, generator=generator, dtype=torch.float64),
        "edge_vector": direction / direction.norm(dim=1, keepdim=True) * length,
        "logit_scale": 1 + 0.3 * torch.randn(num_edges, heads, generator=generator, dtype=torch.float64),
        "logit_bias": torch.randn(num_edges, heads, generator=generator, dtype=torch.float64),
        "value_weight": 1 + 0.3 * torch.randn(num_edges, heads, generator=generator, dtype=torch.float64),
    }
    grad_out = None
    results = {}
    for use_kernel in (False, True):
        tensors = {k: v.to("cuda", dtype).requires_grad_(True) for k, v in inputs.items()}
        out = neighbor_attention(
            **tensors, row_ptr=row_ptr.cuda(), source_index=source_index.cuda(), cutoff=cutoff,
            payload=payload, use_kernel=use_kernel,
        )
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to("cuda", dtype)
        grads = torch.autograd.grad(out, list(tensors.values()), grad_out)
        results[use_kernel] = [out.detach()] + list(grads)
    tolerance = 2e-4 if dtype == torch.float32 else 1e-10
    names = ["out"] + list(inputs)
    for name, reference, kernel in zip(names, results[False], results[True]):
        error = (kernel - reference).norm() / reference.norm().clamp(min=1e-30)
        assert error < tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_on_cuda_with_kernel_matches_cpu_reference(dtype):
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
