"""The torch_scatter stand-in that bench_throughput's EquiformerV2 peer imports (benchmarks/peer_shims)."""

import pytest
import torch
from conftest import load_file


@pytest.fixture(scope="module")
def torch_scatter():
    return load_file("benchmarks/peer_shims/torch_scatter/__init__.py", "torch_scatter_shim")


def test_scatter_matches_index_add_and_its_reductions(torch_scatter):
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(11, 4, generator=generator, dtype=torch.float64)
    index = torch.tensor([0, 3, 3, 1, 0, 3, 1, 1, 0, 3, 3])
    total = torch.zeros(5, 4, dtype=torch.float64).index_add_(0, index, src)
    counts = torch.bincount(index, minlength=5).clamp(min=1)[:, None]
    assert torch.allclose(torch_scatter.scatter(src, index, dim=0, dim_size=5), total)
    assert torch.allclose(torch_scatter.scatter(src, index, dim=0, dim_size=5, reduce="mean"), total / counts)
    maximum = torch_scatter.scatter(src, index, dim=0, reduce="max")
    assert maximum.shape == (4, 4)  # dim_size from the largest index
    for row in range(4):
        expected = src[index == row].amax(0) if (index == row).any() else torch.zeros(4, dtype=torch.float64)
        assert torch.equal(maximum[row], expected)
    assert torch.equal(torch_scatter.segment_coo(torch.ones(5), torch.tensor([0, 0, 1, 1, 1]), dim_size=3),
                       torch.tensor([2.0, 3.0, 0.0]))
