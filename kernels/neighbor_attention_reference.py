"""Neighbour attention with an attention sink and a smooth envelope: plain PyTorch reference.

This is the CPU path, the path used when double backward is needed (training on
conservative forces) and the oracle for the Triton kernel in ``neighbor_attention.py``.

Graph convention: edge ``e`` goes from source atom ``j = source_index[e]`` to target atom
``i``; edges are stored as a CSR sorted by target, the edges of ``i`` being
``row_ptr[i] <= e < row_ptr[i + 1]``. The edge vector is ``r_e = r_j - r_i`` (plus the
periodic shift), in Å.

For target ``i`` and head ``h``, with ``d_e = |r_e|`` and the envelope
``p(d) = 1 - 6x^5 + 15x^4 - 10x^3`` (``x = d / cutoff``, ``p = 0`` beyond the cutoff)::

    s_e = logit_scale[e, h] * <query[i, h], key[j, h]> / sqrt(D) + logit_bias[e, h]
    P_e = p(d_e) exp(s_e) / (sink + sum_{e' of i} p(d_e') exp(s_e'))
    out[i, a, h, :] = sum_{e of i} P_e * value_weight[e, h] * u_e[a] * value[j, h, :]

with the payload ``u_e = r_e / d_e`` (``"direction"``, A = 3) or ``u_e = [1 / d_e]``
(``"inverse_distance"``, A = 1). The sink is a neighbour with logit ``log(sink)`` and no
value, so atoms whose neighbours are all weak attend mostly to nothing, and atoms with no
neighbours get 0.
"""

import math

import torch

PAYLOAD_WIDTH = {"direction": 3, "inverse_distance": 1}


def envelope(distance: torch.Tensor, cutoff) -> torch.Tensor:
    """Smooth cutoff p(d) = 1 - 6x^5 + 15x^4 - 10x^3 with x = d / cutoff; 0 for d >= cutoff.

    p, p' and p'' vanish at the cutoff, so attention weights and forces are continuous when an
    atom crosses it. Evaluated as (1 - x)^3 (1 + 3x + 6x^2), which keeps its relative precision
    up to the cutoff: the expanded sum cancels to 1e-7 absolute noise in float32, 600 times p itself
    at 0.9996 cutoff, where one large logit lets that noise decide the attention weight.
    `cutoff` is a float or a tensor broadcasting with `distance`.
    """
    x = (distance / cutoff).clamp(max=1.0)
    return (1.0 - x) ** 3 * (1.0 + x * (3.0 + 6.0 * x))


def edge_payload(edge_vector: torch.Tensor, payload: str) -> torch.Tensor:
    """The geometric factor u_e of each edge: [E, 3] unit vectors or [E, 1] inverse distances (1/Å)."""
    distance = edge_vector.norm(dim=-1, keepdim=True)
    if payload == "direction":
        return edge_vector / distance
    if payload == "inverse_distance":
        return 1.0 / distance
    raise ValueError(f"payload must be one of {sorted(PAYLOAD_WIDTH)}, got {payload!r}")


def target_index_from_row_ptr(row_ptr: torch.Tensor, num_edges: int) -> torch.Tensor:
    """[E] target atom of each edge, expanded from the CSR row pointer [N + 1]."""
    counts = row_ptr[1:] - row_ptr[:-1]
    nodes = torch.arange(counts.numel(), device=row_ptr.device)
    return torch.repeat_interleave(nodes, counts, output_size=num_edges)


def neighbor_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    edge_vector: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    value_weight: torch.Tensor,
    row_ptr: torch.Tensor,
    source_index: torch.Tensor,
    cutoff: float,
    payload: str = "direction",
    sink: float = 1e-3,
) -> torch.Tensor:
    """Neighbour attention by gather / scatter; differentiable to any order.

    Args:
        query, key: [N, H, D] invariant per-head query and key of each atom.
        value: [N, H, V] per-head value payload of each atom.
        edge_vector: [E, 3] r_j - r_i in Å for each edge (j = source, i = target).
        logit_scale, logit_bias, value_weight: [E, H] per-edge, per-head scalars.
        row_ptr: [N + 1] CSR row pointer of the edges sorted by target.
        source_index: [E] source atom j of each edge.
        cutoff: envelope radius in Å.
        payload: "direction" (u = r / |r|, A = 3) or "inverse_distance" (u = 1 / |r|, A = 1).
        sink: weight of the attention sink (> 0).

    Returns:
        out: [N, A, H, V].

    Memory: materialises the gathered keys ([E, H, D]) and the values gathered into rows padded to
    the largest degree K ([N, K, H, V]); use the Triton kernel where that matters.
    """
    if sink <= 0:
        raise ValueError("sink must be positive")
    num_nodes, num_heads, head_dim = query.shape
    num_edges = source_index.numel()
    target_index = target_index_from_row_ptr(row_ptr, num_edges)

    distance = edge_vector.norm(dim=-1)
    u = edge_payload(edge_vector, payload)  # [E, A]
    qk = (query.index_select(0, target_index) * key.index_select(0, source_index)).sum(-1)  # [E, H]
    logit = logit_scale * qk / math.sqrt(head_dim) + logit_bias

    # Per-target shift: the largest logit of the sink and the edges inside the cutoff (p > 0; an edge
    # with p = 0 adds nothing, and a huge logit of its own would underflow everyone else's weight).
    # The softmax does not depend on the shift, so it is detached: the gradient stays exact and the
    # max needs no derivative. The clamp bounds exp() for the p = 0 edges only (0 x inf would be NaN).
    log_sink = math.log(sink)
    p = envelope(distance, cutoff)[:, None]
    shift = torch.full((num_nodes, num_heads), log_sink, dtype=logit.dtype, device=logit.device)
    live_logit = torch.where(p > 0, logit.detach(), -math.inf)
    shift = shift.scatter_reduce(0, target_index[:, None].expand(-1, num_heads), live_logit, "amax")

    weight = p * torch.exp((logit - shift[target_index]).clamp(max=0.0))  # [E, H]
    denominator = torch.exp(log_sink - shift).index_add(0, target_index, weight)  # [N, H]
    probability = weight / denominator[target_index]

    # The weighted sum over each target's edges as one batched matmul over (head, target): the
    # edges of a target are padded to the largest degree K (padding slots carry coefficient 0 and
    # the values of atom 0), so no [E, A, H, V] message tensor and no scatter of one is formed.
    # Values are gathered head-major, [H * N, K, V], so that neither the matmul nor its gradient
    # needs the large gathered tensor transposed.
    degree = row_ptr[1:] - row_ptr[:-1]
    max_degree = int(degree.max()) if num_edges else 0  # a host sync on CUDA (training only)
    width = u.shape[1]
    slot = torch.arange(num_edges, device=row_ptr.device) - row_ptr[target_index]  # [E] place in its row
    padded_source = source_index.new_zeros(num_nodes, max_degree).index_put((target_index, slot), source_index)
    coefficient = (probability * value_weight)[:, :, None] * u[:, None, :]  # [E, H, A]
    padded_coefficient = coefficient.new_zeros(num_nodes, max_degree, num_heads, width)
    padded_coefficient = padded_coefficient.index_put((target_index, slot), coefficient)  # [N, K, H, A]
    coefficient_by_head = padded_coefficient.permute(2, 0, 3, 1).reshape(num_heads * num_nodes, width, max_degree)
    # index_select rather than [...] indexing: its backward is an index_add, several times faster on
    # the CPU than the accumulating index_put of advanced indexing.
    num_sources = value.shape[0]  # all atoms; the targets (query rows) may be a chunk of them
    head_offset = torch.arange(num_heads, device=row_ptr.device)[:, None] * num_sources
    rows = (head_offset + padded_source.reshape(1, -1)).reshape(-1)  # row (h, j) of value_by_head per (h, i, k)
    value_width = value.shape[-1]
    value_by_head = value.transpose(0, 1).reshape(num_heads * num_sources, value_width)  # [H * N_sources, V]
    gathered = value_by_head.index_select(0, rows).view(num_heads * num_nodes, max_degree, value_width)  # [H * N, K, V]
    out = torch.bmm(coefficient_by_head, gathered)  # [H * N, A, V]
    return out.view(num_heads, num_nodes, width, value_width).permute(1, 2, 0, 3).contiguous()  # [N, A, H, V]
