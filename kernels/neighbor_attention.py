"""Fused neighbour attention (Triton): forward, recomputing backward, autograd Function, dispatch.

The op (see ``neighbor_attention_reference.py`` for the formula and the graph convention,
r_e = r_j - r_i for edge e from source j to target i, CSR sorted by target)::

    out[i, a, h, :] = sum_{e of i} P_e * value_weight[e, h] * u_e[a] * value[j, h, :]
    P_e = p(d_e) exp(s_e) / (sink + sum_{e' of i} p(d_e') exp(s_e'))
    s_e = logit_scale[e, h] * <query[i, h], key[j, h]> / sqrt(D) + logit_bias[e, h]

Three kernels, FlashAttention-2 style:

* ``_forward_kernel``: one program per (tile of BLOCK_M targets, head). It walks the tile's
  CSR rows in lock step (one edge per target per step, up to the tile's longest row, shorter
  rows masked), gathers k_j and v_j, and keeps the online softmax state (running max mu,
  denominator z) and the [A, V] accumulator of each target in registers. The sink is the
  first "neighbour": mu starts at log(sink) and z at 1. The envelope multiplies exp(s - mu)
  rather than entering the logit as log p, because p -> 0 at the cutoff. Writes out and
  lse = mu + log z per (target, head).
* ``_backward_target_kernel``: same tiling. Recomputes P_e = p(d_e) exp(s_e - lse_i) and
  writes everything that belongs to one target: d query, and per edge d logit_scale,
  d logit_bias, d value_weight and the per-head part of d edge_vector. Each edge belongs to
  exactly one target, so there are no atomics.
* ``_backward_source_kernel``: one program per (tile of sources, head) over the transposed
  CSR (edges grouped by source, ``transpose_neighbors``). Recomputes P_e and accumulates
  d key and d value in registers. Deterministic, no atomics.

Backward algebra, per (edge e, head), with G_a = dOut[i, a, h, :], c_a = <G_a, v_j>,
c = sum_a u_a c_a and Delta_i = sum_{a, v} dOut * Out (FlashAttention-2's row term):
  d value_weight = P c,   d s = P (value_weight c - Delta_i)   (= d logit_bias),
  d u_a = P value_weight c_a,   d d_e (envelope) = exp(s - lse) (value_weight c - Delta_i) p'(d),
the last written without dividing by p, which vanishes at the cutoff.

What stays O(E), in bytes per edge (4-byte floats): the forward reads the neighbour index
(4 or 8) and the edge vector (12), once per head program (so H times, mostly from L2), and the
three edge scalars per head (12 H). The backward reads them twice (target and source kernels),
writes the three edge-scalar gradients (12 H) and a per-head partial of d edge_vector (12 H,
summed over heads in PyTorch: the heads of one edge live in different programs), and uses the
transposed CSR (two indices per edge, built once per graph). No E x D or E x V tensor is formed.

The autograd Function is differentiable once: its backward is not itself differentiable.
For double backward (training on conservative forces) call ``neighbor_attention`` with
``use_kernel=False``, which runs the PyTorch reference.
"""

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .neighbor_attention_reference import (
    PAYLOAD_WIDTH,
    neighbor_attention_reference,
    target_index_from_row_ptr,
)

NUM_WARPS = 4


class TransposedNeighbors(NamedTuple):
    """Edges grouped by source atom: the CSR of the transposed graph.

    col_ptr: [N + 1] the edges of source j are slots col_ptr[j] <= t < col_ptr[j + 1].
    edge_of_slot: [E] edge id (position in the target-sorted CSR) of each slot.
    target_of_slot: [E] target atom i of each slot.
    """

    col_ptr: torch.Tensor
    edge_of_slot: torch.Tensor
    target_of_slot: torch.Tensor


def transpose_neighbors(row_ptr: torch.Tensor, source_index: torch.Tensor) -> TransposedNeighbors:
    """Build the source-grouped CSR once per graph (cache it and pass it as ``transpose=``)."""
    num_nodes = row_ptr.numel() - 1
    num_edges = source_index.numel()
    target_index = target_index_from_row_ptr(row_ptr, num_edges)
    edge_of_slot = torch.argsort(source_index, stable=True)
    counts = torch.bincount(source_index, minlength=num_nodes)
    col_ptr = torch.zeros(num_nodes + 1, dtype=torch.int64, device=row_ptr.device)
    col_ptr[1:] = torch.cumsum(counts, 0)
    return TransposedNeighbors(col_ptr, edge_of_slot, target_index[edge_of_slot])


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _envelope(distance, cutoff):
    """p(d) and dp/dd for p = 1 - 6x^5 + 15x^4 - 10x^3, x = d / cutoff; both 0 beyond the cutoff."""
    x = distance / cutoff
    inside = x < 1.0
    p = 1.0 + x * x * x * (-10.0 + x * (15.0 - 6.0 * x))
    dp = -30.0 * x * x * (1.0 - x) * (1.0 - x) / cutoff
    return tl.where(inside, p, 0.0), tl.where(inside, dp, 0.0)


@triton.jit
def _load_edge_geometry(R, edge, valid, cutoff):
    """Edge vector components rx, ry, rz [M], distance [M] (1 on masked lanes), p and p'."""
    rx = tl.load(R + edge * 3, mask=valid, other=0.0)
    ry = tl.load(R + edge * 3 + 1, mask=valid, other=0.0)
    rz = tl.load(R + edge * 3 + 2, mask=valid, other=0.0)
    distance = tl.where(valid, tl.sqrt(rx * rx + ry * ry + rz * rz), 1.0)
    p, dp = _envelope(distance, cutoff)
    return rx, ry, rz, distance, p, dp


@triton.jit
def _payload_columns(rx, ry, rz, distance, col_a, DIRECTION: tl.constexpr):
    """u_e[a] laid out over the flattened (a, v) columns: [M, BLOCK_AV] (direction) or [M, 1]."""
    inverse = 1.0 / distance
    if DIRECTION:
        a = col_a[None, :]
        return tl.where(a == 0, (rx * inverse)[:, None], tl.where(a == 1, (ry * inverse)[:, None], (rz * inverse)[:, None]))
    else:
        return inverse[:, None]


@triton.jit
def _load_scalar_params(PARAMS):
    """cutoff, log(sink) and 1/sqrt(D), read from a tensor so they keep the compute precision."""
    return tl.load(PARAMS), tl.log(tl.load(PARAMS + 1)), tl.load(PARAMS + 2)


# The per-target [A, V] blocks are flattened to one axis of BLOCK_AV = BLOCK_A * BLOCK_V columns,
# column c holding (a, v) = (c // BLOCK_V, c % BLOCK_V): 2-D tiles only (3-D tiles with
# broadcasts crashed Triton 3.6's layout pass on sm_90).

# ----------------------------------------------------------------------------- forward


@triton.jit
def _forward_kernel(
    Q, K, V, R, SCALE, BIAS, VW, ROW_PTR, SRC, PARAMS,  # inputs
    OUT, LSE,  # outputs: [N, A, H, V], [N, H]
    N, H, D, VD, A,
    DIRECTION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_AV: tl.constexpr,
):
    head = tl.program_id(1)
    node = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    node_ok = node < N
    row_start = tl.load(ROW_PTR + node, mask=node_ok, other=0).to(tl.int64)
    degree = tl.load(ROW_PTR + node + 1, mask=node_ok, other=0).to(tl.int64) - row_start
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_av = tl.arange(0, BLOCK_AV)
    col_a = offs_av // BLOCK_V
    col_v = offs_av % BLOCK_V
    col_ok = (col_a < A) & (col_v < VD)

    q = tl.load(Q + ((node * H + head) * D)[:, None] + offs_d[None, :], mask=node_ok[:, None] & d_ok[None, :], other=0.0)
    cutoff, log_sink, qk_scale = _load_scalar_params(PARAMS)

    mu = tl.zeros([BLOCK_M], dtype=q.dtype) + log_sink  # the sink is the first neighbour
    z = tl.zeros([BLOCK_M], dtype=q.dtype) + 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_AV], dtype=q.dtype)
    for step in range(0, tl.max(degree, axis=0)):
        valid = step < degree
        edge = row_start + step
        src = tl.load(SRC + edge, mask=valid, other=0).to(tl.int64)
        key = tl.load(K + ((src * H + head) * D)[:, None] + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        g = tl.load(SCALE + edge * H + head, mask=valid, other=0.0)
        b = tl.load(BIAS + edge * H + head, mask=valid, other=0.0)
        phi = tl.load(VW + edge * H + head, mask=valid, other=0.0)
        rx, ry, rz, distance, p, dp = _load_edge_geometry(R, edge, valid, cutoff)
        u = _payload_columns(rx, ry, rz, distance, col_a, DIRECTION)

        s = tl.where(valid, g * tl.sum(q * key, axis=1) * qk_scale + b, float("-inf"))
        mu_new = tl.maximum(mu, s)
        rescale = tl.exp(mu - mu_new)
        w = tl.where(valid, p * tl.exp(s - mu_new), 0.0)
        z = z * rescale + w
        val = tl.load(V + ((src * H + head) * VD)[:, None] + col_v[None, :], mask=valid[:, None] & col_ok[None, :], other=0.0)
        acc = acc * rescale[:, None] + (w * phi)[:, None] * u * val
        mu = mu_new

    out_ptr = OUT + ((node[:, None] * A + col_a[None, :]) * H + head) * VD + col_v[None, :]
    tl.store(out_ptr, acc / z[:, None], mask=node_ok[:, None] & col_ok[None, :])
    tl.store(LSE + node * H + head, mu + tl.log(z), mask=node_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _backward_target_kernel(
    Q, K, V, R, SCALE, BIAS, VW, ROW_PTR, SRC, PARAMS, OUT, LSE, DOUT,  # inputs
    DQ, DSCALE, DBIAS, DVW, DR_PER_HEAD,  # outputs: [N, H, D], 3 x [E, H], [E, H, 3]
    N, H, D, VD, A,
    DIRECTION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_AV: tl.constexpr,
):
    head = tl.program_id(1)
    node = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    node_ok = node < N
    row_start = tl.load(ROW_PTR + node, mask=node_ok, other=0).to(tl.int64)
    degree = tl.load(ROW_PTR + node + 1, mask=node_ok, other=0).to(tl.int64) - row_start
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_av = tl.arange(0, BLOCK_AV)
    col_a = offs_av // BLOCK_V
    col_v = offs_av % BLOCK_V
    col_ok = (col_a < A) & (col_v < VD)

    q_offset = ((node * H + head) * D)[:, None] + offs_d[None, :]
    q = tl.load(Q + q_offset, mask=node_ok[:, None] & d_ok[None, :], other=0.0)
    cutoff, log_sink_unused, qk_scale = _load_scalar_params(PARAMS)
    lse = tl.load(LSE + node * H + head, mask=node_ok, other=0.0)
    row_offset = ((node[:, None] * A + col_a[None, :]) * H + head) * VD + col_v[None, :]
    row_mask = node_ok[:, None] & col_ok[None, :]
    grad_out = tl.load(DOUT + row_offset, mask=row_mask, other=0.0)  # [M, AV]
    delta = tl.sum(grad_out * tl.load(OUT + row_offset, mask=row_mask, other=0.0), axis=1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=q.dtype)
    for step in range(0, tl.max(degree, axis=0)):
        valid = step < degree
        edge = row_start + step
        src = tl.load(SRC + edge, mask=valid, other=0).to(tl.int64)
        key = tl.load(K + ((src * H + head) * D)[:, None] + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        val = tl.load(V + ((src * H + head) * VD)[:, None] + col_v[None, :], mask=valid[:, None] & col_ok[None, :], other=0.0)
        g = tl.load(SCALE + edge * H + head, mask=valid, other=0.0)
        b = tl.load(BIAS + edge * H + head, mask=valid, other=0.0)
        phi = tl.load(VW + edge * H + head, mask=valid, other=0.0)
        rx, ry, rz, distance, p, dp = _load_edge_geometry(R, edge, valid, cutoff)
        u = _payload_columns(rx, ry, rz, distance, col_a, DIRECTION)

        qk = tl.sum(q * key, axis=1)
        unenveloped = tl.where(valid, tl.exp(g * qk * qk_scale + b - lse), 0.0)  # P_e / p_e
        prob = p * unenveloped
        grad_val = grad_out * val  # [M, AV]: dOut[a, v] * v_j[v]
        c = tl.sum(grad_val * u, axis=1)
        d_logit = prob * (phi * c - delta)
        tl.store(DSCALE + edge * H + head, d_logit * qk * qk_scale, mask=valid)
        tl.store(DBIAS + edge * H + head, d_logit, mask=valid)
        tl.store(DVW + edge * H + head, prob * c, mask=valid)
        dq += (d_logit * g * qk_scale)[:, None] * key

        d_distance = unenveloped * (phi * c - delta) * dp
        inverse = 1.0 / distance
        ux, uy, uz = rx * inverse, ry * inverse, rz * inverse
        if DIRECTION:  # d(r/|r|)/dr = (1 - r_hat r_hat^T) / |r|
            dux = prob * phi * tl.sum(tl.where(col_a[None, :] == 0, grad_val, 0.0), axis=1)
            duy = prob * phi * tl.sum(tl.where(col_a[None, :] == 1, grad_val, 0.0), axis=1)
            duz = prob * phi * tl.sum(tl.where(col_a[None, :] == 2, grad_val, 0.0), axis=1)
            radial = ux * dux + uy * duy + uz * duz
            drx = d_distance * ux + (dux - ux * radial) * inverse
            dry = d_distance * uy + (duy - uy * radial) * inverse
            drz = d_distance * uz + (duz - uz * radial) * inverse
        else:  # d(1/|r|)/dr = -r_hat / |r|^2
            along = d_distance - prob * phi * tl.sum(grad_val, axis=1) * inverse * inverse
            drx, dry, drz = along * ux, along * uy, along * uz
        d_r_ptr = DR_PER_HEAD + (edge * H + head) * 3
        tl.store(d_r_ptr, drx, mask=valid)
        tl.store(d_r_ptr + 1, dry, mask=valid)
        tl.store(d_r_ptr + 2, drz, mask=valid)

    tl.store(DQ + q_offset, dq, mask=node_ok[:, None] & d_ok[None, :])


@triton.jit
def _backward_source_kernel(
    Q, K, R, SCALE, BIAS, VW, COL_PTR, EDGE_OF_SLOT, TARGET_OF_SLOT, PARAMS, LSE, DOUT, DBIAS,  # inputs
    DK, DV,  # outputs: [N, H, D], [N, H, V]
    N, H, D, VD, A,
    DIRECTION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_AV: tl.constexpr,
):
    head = tl.program_id(1)
    node = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    node_ok = node < N
    slot_start = tl.load(COL_PTR + node, mask=node_ok, other=0).to(tl.int64)
    degree = tl.load(COL_PTR + node + 1, mask=node_ok, other=0).to(tl.int64) - slot_start
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    d_ok = offs_d < D
    v_ok = offs_v < VD

    k_offset = ((node * H + head) * D)[:, None] + offs_d[None, :]
    key = tl.load(K + k_offset, mask=node_ok[:, None] & d_ok[None, :], other=0.0)
    cutoff, log_sink_unused, qk_scale = _load_scalar_params(PARAMS)

    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=key.dtype)
    dv = tl.zeros([BLOCK_M, BLOCK_V], dtype=key.dtype)
    for step in range(0, tl.max(degree, axis=0)):
        valid = step < degree
        slot = slot_start + step
        edge = tl.load(EDGE_OF_SLOT + slot, mask=valid, other=0).to(tl.int64)
        tgt = tl.load(TARGET_OF_SLOT + slot, mask=valid, other=0).to(tl.int64)
        q = tl.load(Q + ((tgt * H + head) * D)[:, None] + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + tgt * H + head, mask=valid, other=0.0)
        g = tl.load(SCALE + edge * H + head, mask=valid, other=0.0)
        b = tl.load(BIAS + edge * H + head, mask=valid, other=0.0)
        phi = tl.load(VW + edge * H + head, mask=valid, other=0.0)
        d_logit = tl.load(DBIAS + edge * H + head, mask=valid, other=0.0)  # written by the target kernel
        rx, ry, rz, distance, p, dp = _load_edge_geometry(R, edge, valid, cutoff)

        prob = tl.where(valid, p * tl.exp(g * tl.sum(q * key, axis=1) * qk_scale + b - lse), 0.0)
        weight = prob * phi / distance  # times r for the direction payload, alone for 1/|r|
        grad_out_ptr = DOUT + ((tgt * A * H + head) * VD)[:, None] + offs_v[None, :]  # row a = 0
        grad_mask = valid[:, None] & v_ok[None, :]
        if DIRECTION:  # sum_a u_a dOut[a] with u = r / |r|; rows a are H * VD apart
            grad_x = tl.load(grad_out_ptr, mask=grad_mask, other=0.0)
            grad_y = tl.load(grad_out_ptr + H * VD, mask=grad_mask, other=0.0)
            grad_z = tl.load(grad_out_ptr + 2 * H * VD, mask=grad_mask, other=0.0)
            dv += weight[:, None] * (rx[:, None] * grad_x + ry[:, None] * grad_y + rz[:, None] * grad_z)
        else:  # u = 1 / |r|
            dv += weight[:, None] * tl.load(grad_out_ptr, mask=grad_mask, other=0.0)
        dk += (d_logit * g * qk_scale)[:, None] * q

    tl.store(DK + k_offset, dk, mask=node_ok[:, None] & d_ok[None, :])
    tl.store(DV + ((node * H + head) * VD)[:, None] + offs_v[None, :], dv, mask=node_ok[:, None] & v_ok[None, :])


# ----------------------------------------------------------------------------- launch + autograd


def _launch_config(num_nodes, num_heads, head_dim, value_dim, payload):
    """Compile-time block sizes and the grid (tiles of targets x heads)."""
    block_a = 4 if payload == "direction" else 1
    block_v = triton.next_power_of_2(value_dim)
    # 16 targets per tile: Triton 3.6 crashed in its layout pass (sm_90) for BLOCK_M = 32 and for
    # 64 with 4 warps, across head/value widths (benchmarks/kernel_configs.py sweeps this).
    block_m = 16
    meta = dict(
        DIRECTION=payload == "direction",
        BLOCK_M=block_m,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_V=block_v,
        BLOCK_AV=block_a * block_v,
        num_warps=NUM_WARPS,
    )
    grid = (triton.cdiv(num_nodes, block_m), num_heads)
    return grid, meta


class NeighborAttentionFunction(torch.autograd.Function):
    """Triton forward and backward; differentiable once (backward is not differentiable)."""

    @staticmethod
    def forward(ctx, query, key, value, edge_vector, logit_scale, logit_bias, value_weight,
                row_ptr, source_index, transpose, cutoff, payload, sink):
        query, key, value, edge_vector, logit_scale, logit_bias, value_weight = (
            t.contiguous() for t in (query, key, value, edge_vector, logit_scale, logit_bias, value_weight)
        )
        num_nodes, num_heads, head_dim = query.shape
        value_dim = value.shape[-1]
        width = PAYLOAD_WIDTH[payload]
        params = torch.tensor([cutoff, sink, head_dim**-0.5], dtype=torch.float64).to(query.device, query.dtype)
        out = query.new_empty(num_nodes, width, num_heads, value_dim)
        lse = query.new_empty(num_nodes, num_heads)
        grid, meta = _launch_config(num_nodes, num_heads, head_dim, value_dim, payload)
        _forward_kernel[grid](
            query, key, value, edge_vector, logit_scale, logit_bias, value_weight, row_ptr, source_index, params,
            out, lse, num_nodes, num_heads, head_dim, value_dim, width, **meta,
        )
        ctx.save_for_backward(query, key, value, edge_vector, logit_scale, logit_bias, value_weight,
                              row_ptr, source_index, params, out, lse)
        ctx.transpose = transpose
        ctx.payload = payload
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (query, key, value, edge_vector, logit_scale, logit_bias, value_weight,
         row_ptr, source_index, params, out, lse) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        num_nodes, num_heads, head_dim = query.shape
        value_dim = value.shape[-1]
        width = out.shape[1]
        grid, meta = _launch_config(num_nodes, num_heads, head_dim, value_dim, ctx.payload)

        d_query = torch.empty_like(query)
        d_scale = torch.empty_like(logit_scale)
        d_bias = torch.empty_like(logit_bias)
        d_value_weight = torch.empty_like(value_weight)
        d_edge_vector_per_head = edge_vector.new_empty(edge_vector.shape[0], num_heads, 3)
        _backward_target_kernel[grid](
            query, key, value, edge_vector, logit_scale, logit_bias, value_weight, row_ptr, source_index, params,
            out, lse, grad_out,
            d_query, d_scale, d_bias, d_value_weight, d_edge_vector_per_head,
            num_nodes, num_heads, head_dim, value_dim, width, **meta,
        )

        transpose = ctx.transpose if ctx.transpose is not None else transpose_neighbors(row_ptr, source_index)
        d_key = torch.empty_like(key)
        d_value = torch.empty_like(value)
        _backward_source_kernel[grid](
            query, key, edge_vector, logit_scale, logit_bias, value_weight,
            transpose.col_ptr, transpose.edge_of_slot, transpose.target_of_slot, params, lse, grad_out, d_bias,
            d_key, d_value,
            num_nodes, num_heads, head_dim, value_dim, width, **meta,
        )
        return (d_query, d_key, d_value, d_edge_vector_per_head.sum(1), d_scale, d_bias, d_value_weight,
                None, None, None, None, None, None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def neighbor_attention(
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
    transpose: Optional[TransposedNeighbors] = None,
    use_kernel: Optional[bool] = None,
) -> torch.Tensor:
    """Neighbour attention with an attention sink and a smooth envelope.

    Args:
        query, key: [N, H, D] invariant per-head query and key of each atom.
        value: [N, H, V] per-head value payload of each atom.
        edge_vector: [E, 3] r_j - r_i (+ periodic shift) in Å, edge e from source j to target i.
        logit_scale, logit_bias, value_weight: [E, H] per-edge, per-head scalars.
        row_ptr: [N + 1] CSR row pointer, edges sorted by target.
        source_index: [E] source atom j of each edge.
        cutoff: envelope radius in Å; every edge should have |r| < cutoff (p = 0 beyond).
        payload: "direction" (u = r / |r|, A = 3) or "inverse_distance" (u = 1 / |r|, A = 1).
        sink: attention-sink weight (> 0).
        transpose: ``transpose_neighbors(row_ptr, source_index)``, cached per graph; built in
            the backward when omitted.
        use_kernel: None runs Triton for CUDA tensors and the reference otherwise; True forces
            Triton (CUDA, or CPU under TRITON_INTERPRET=1); False forces the reference, which is
            the one to use when double backward is needed (the Triton backward is once
            differentiable).

    Returns:
        out: [N, A, H, V], float32 or float64 like the inputs.
    """
    if payload not in PAYLOAD_WIDTH:
        raise ValueError(f"payload must be one of {sorted(PAYLOAD_WIDTH)}, got {payload!r}")
    if sink <= 0:
        raise ValueError("sink must be positive")
    if use_kernel is None:
        use_kernel = query.is_cuda
    if use_kernel and not (query.is_cuda or _interpreting()):
        raise RuntimeError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if not use_kernel or query.shape[0] == 0 or source_index.numel() == 0:  # nothing for a kernel to do
        return neighbor_attention_reference(query, key, value, edge_vector, logit_scale, logit_bias,
                                            value_weight, row_ptr, source_index, cutoff, payload, sink)
    dtypes = {t.dtype for t in (query, key, value, edge_vector, logit_scale, logit_bias, value_weight)}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.float64):
        raise TypeError("floating inputs must all be float32 or all float64")
    return NeighborAttentionFunction.apply(query, key, value, edge_vector, logit_scale, logit_bias, value_weight,
                                           row_ptr, source_index, transpose, float(cutoff), payload, float(sink))
