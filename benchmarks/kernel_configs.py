"""Which launch configurations of the neighbour-attention kernels compile and agree with the reference.

Triton's layout passes have crashed on some tile shapes on sm_90; this sweeps BLOCK_M and
num_warps for a few (H, D, V, payload) shapes, runs forward + backward on a small random graph
and prints the relative error of every output against the PyTorch reference (or the error).

    python -m benchmarks.kernel_configs
"""

from __future__ import annotations

import itertools

import torch
import triton

import e2former_calc.kernels.neighbor_attention as attention

SHAPES = [(4, 8, 18, "direction"), (16, 16, 64, "direction"), (16, 16, 64, "inverse_distance"), (3, 5, 29, "inverse_distance")]


def random_problem(heads, head_dim, value_dim, generator, num_nodes=200, max_degree=30):
    degree = torch.randint(0, max_degree + 1, (num_nodes,), generator=generator)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), degree.cumsum(0)]).cuda()
    num_edges = int(degree.sum())
    source_index = torch.randint(0, num_nodes, (num_edges,), generator=generator).cuda()
    direction = torch.randn(num_edges, 3, generator=generator)
    vectors = direction / direction.norm(dim=1, keepdim=True) * (0.5 + 4 * torch.rand(num_edges, 1, generator=generator))
    tensors = [torch.randn(num_nodes, heads, head_dim, generator=generator), torch.randn(num_nodes, heads, head_dim, generator=generator),
               torch.randn(num_nodes, heads, value_dim, generator=generator), vectors,
               1 + 0.3 * torch.randn(num_edges, heads, generator=generator), torch.randn(num_edges, heads, generator=generator),
               1 + 0.3 * torch.randn(num_edges, heads, generator=generator)]
    return [t.cuda() for t in tensors], row_ptr, source_index


def run(tensors, row_ptr, source_index, payload, use_kernel):
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    out = attention.neighbor_attention(*inputs, row_ptr, source_index, 5.0, payload=payload, use_kernel=use_kernel)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    return [out] + list(grads)


def main():
    original = attention._launch_config
    generator = torch.Generator().manual_seed(0)
    for (heads, head_dim, value_dim, payload), block_m, warps in itertools.product(SHAPES, (16, 32, 64), (2, 4)):
        def launch_config(num_nodes, num_heads, d, v, p, block_m=block_m, warps=warps):
            grid, meta = original(num_nodes, num_heads, d, v, p)
            meta.update(BLOCK_M=block_m, num_warps=warps)
            return (triton.cdiv(num_nodes, block_m), num_heads), meta

        attention._launch_config = launch_config
        tensors, row_ptr, source_index = random_problem(heads, head_dim, value_dim, generator)
        try:
            reference = run(tensors, row_ptr, source_index, payload, False)
            kernel = run(tensors, row_ptr, source_index, payload, True)
            errors = [((k - r).norm() / r.norm()).item() for k, r in zip(kernel, reference)]
            verdict = f"max rel err {max(errors):.1e}"
        except Exception as error:  # noqa: BLE001 -- a compiler crash is what we sweep for
            verdict = f"FAILED: {type(error).__name__}"
        print(f"H={heads:3d} D={head_dim:3d} V={value_dim:3d} {payload:16s} BLOCK_M={block_m:3d} warps={warps}: {verdict}", flush=True)
    attention._launch_config = original


if __name__ == "__main__":
    main()
