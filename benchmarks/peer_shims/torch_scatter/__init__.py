"""Stand-in for torch_scatter inside the EquiformerV2 peer of bench_throughput.

fairchem-core 1.x imports torch_scatter at module level (its utilities), but torch_scatter is a
compiled extension with no build for the GPU machine's torch 2.11 + CUDA 13. EquiformerV2's own
forward pass does not call it; the graph utilities that might (neighbour counts) get the same
reductions from PyTorch's scatter_reduce.
"""

import torch

_REDUCTIONS = {"sum": "sum", "add": "sum", "mean": "mean", "max": "amax", "min": "amin"}


def scatter(src: torch.Tensor, index: torch.Tensor, dim: int = -1, out=None, dim_size=None, reduce: str = "sum"):
    """torch_scatter.scatter for a 1-D `index` along `dim` (or an index broadcastable to `src`)."""
    if out is not None:
        raise NotImplementedError("scatter(out=...) is not used by EquiformerV2")
    dim = dim % src.dim()
    size = list(src.shape)
    size[dim] = int(index.max()) + 1 if dim_size is None else dim_size
    if index.dim() == 1:
        shape = [1] * src.dim()
        shape[dim] = -1
        index = index.view(shape)
    index = index.expand_as(src)
    return src.new_zeros(size).scatter_reduce(dim, index, src, _REDUCTIONS[reduce], include_self=False)


def segment_coo(src: torch.Tensor, index: torch.Tensor, out=None, dim_size=None, reduce: str = "sum"):
    """torch_scatter.segment_coo: reduce along the index's last dimension (sorted index)."""
    return scatter(src, index, dim=index.dim() - 1, out=out, dim_size=dim_size, reduce=reduce)
