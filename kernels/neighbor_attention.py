"""Fused neighbour attention (Triton): forward, recomputing backward, autograd Function, dispatch.

The op (see ``neighbor_attention_reference.py`` for the formula and the graph convention,
r_e = r_j - r_i for edge e from source j to target i, CSR sorted by target)::

    out[i, a, h, :] = sum_{e of i} P_e * value_weight[e, h] * u_e[a] * value[j, h, :]
    P_e = p(d_e) exp(s_e) / (sink + sum_{e' of i} p(d_e') exp(s_e'))
    s_e = logit_scale[e, h] * <query[i, h], key[j, h]> / sqrt(D) + logit_bias[e, h]

Four kernels, FlashAttention-2 style. The three with a neighbour loop give each program BLOCK_R
consecutive (atom, head) rows (row = atom * H + head, so an atom's heads are neighbouring rows and
one program covers BLOCK_R / H atoms, or part of one when H > BLOCK_R; any H works, rows past N * H
are masked):

* ``_forward_kernel``: walks the CSR rows of its atoms in lock step (one edge per row per step,
  up to the longest row of the tile, shorter rows masked; the next step's source index is
  prefetched), gathers k_j and v_j of each row's head, and keeps the online softmax state
  (running max mu, denominator z) and the value accumulators ([BLOCK_R, BLOCK_V] per payload
  component) in registers. The sink is the first "neighbour": mu starts at log(sink) and z at 1.
  The envelope multiplies exp(s - mu) rather than entering the logit as log p, because p -> 0 at
  the cutoff. Writes out and lse = mu + log z per (atom, head).
* ``_backward_edge_kernel`` (no loop): one row per (edge, head), row = edge * H + head.
  Recomputes P_e = p(d_e) exp(s_e - lse_i) and writes what belongs to one (edge, head):
  d logit_scale, d logit_bias, d value_weight and the per-head part of d edge_vector, each row's
  own, so the stores are contiguous. (These were first written from inside the target-side loop,
  where Triton routed each per-step store through shared memory and a barrier.)
* ``_backward_target_kernel``: the forward's tiling; d query = sum_e d logit_e g_e k_j / sqrt(D).
* ``_backward_source_kernel``: the same over (source atom, head) rows of the transposed CSR
  (edges grouped by source, ``transpose_neighbors``). Recomputes P_e and accumulates d key and
  d value in registers.
Every output element is written by exactly one program: deterministic, no atomics.

Launch knobs (rows per program, warps, neighbour steps unrolled per loop iteration) per kernel come
from DEFAULT_CONFIGS, overridable with the environment variable E2FORMER_ATTENTION_CONFIG
(``_launch_config``; ``16x8`` is the fallback). For the edge kernel EDGES_PER_STEP is the number of
BLOCK_R-row tiles per program. The sizes H, D and V are compile-time constants (a model's are fixed;
each new (H, D, V) compiles once): the row index splits into atom or edge and head by constant
shifts, not 64-bit divisions, and the column masks fold away, which matters because the edge kernel
is bound by instruction issue (Nsight Compute, BENCHMARKS.md).

Backward algebra, per (edge e, head), with G_a = dOut[i, a, h, :], c_a = <G_a, v_j>,
c = sum_a u_a c_a and Delta_i = sum_{a, v} dOut * Out (FlashAttention-2's row term):
  d value_weight = P c,   d s = P (value_weight c - Delta_i)   (= d logit_bias),
  d u_a = P value_weight c_a,   d d_e (envelope) = exp(s - lse) (value_weight c - Delta_i) p'(d),
the last written without dividing by p, which vanishes at the cutoff.

What stays O(E), in bytes per edge (4-byte floats, 8-byte indices): the forward reads the
neighbour index (8) and the edge vector (12) once per program that holds the edge's atom, i.e.
once for all the heads in that program (their repeats are L1 hits; an atom whose heads are
split across programs, when BLOCK_R is not a multiple of H or H > BLOCK_R, is read by each), and the three edge scalars per
head (12 H, contiguous per edge). The edge kernel reads the source and target of each edge (16;
the target index is built once per graph with the transposed CSR), the edge vector and the three
edge scalars per head, and writes the three edge-scalar gradients (12 H) and a per-head part of
d edge_vector (12 H, summed over heads in PyTorch: the heads are different rows of a 2-D tile, and
summing them in-kernel would take a 3-D reshape). The target-side backward reads the index, g and
d logit_bias (8 H). The source-side backward reads the transposed CSR (two indices per edge, 16),
the edge vector, the three edge scalars and d logit_bias (16 H). No E x D or E x V tensor is
formed.

The autograd Function is differentiable once: its backward is not itself differentiable.
For double backward (training on conservative forces) call ``neighbor_attention`` with
``use_kernel=False``, which runs the PyTorch reference.
"""

import functools
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


class TransposedNeighbors(NamedTuple):
    """The graph as the backward reads it: edges grouped by source atom (the CSR of the transposed
    graph) and each edge's target.

    col_ptr: [N + 1] the edges of source j are slots col_ptr[j] <= t < col_ptr[j + 1].
    edge_of_slot: [E] edge id (position in the target-sorted CSR) of each slot.
    target_of_slot: [E] target atom i of each slot.
    target_of_edge: [E] target atom i of each edge, in CSR order.
    """

    col_ptr: torch.Tensor
    edge_of_slot: torch.Tensor
    target_of_slot: torch.Tensor
    target_of_edge: torch.Tensor


def transpose_neighbors(row_ptr: torch.Tensor, source_index: torch.Tensor) -> TransposedNeighbors:
    """Build the backward's view of the graph once per graph (cache it and pass it as ``transpose=``)."""
    num_nodes = row_ptr.numel() - 1
    num_edges = source_index.numel()
    target_index = target_index_from_row_ptr(row_ptr, num_edges)
    edge_of_slot = torch.argsort(source_index, stable=True)
    # searchsorted, not bincount: no host sync (bincount reads the largest index back), so that
    # this may run inside a CUDA-graph capture.
    nodes = torch.arange(num_nodes + 1, dtype=source_index.dtype, device=source_index.device)
    col_ptr = torch.searchsorted(source_index[edge_of_slot], nodes)
    return TransposedNeighbors(col_ptr, edge_of_slot, target_index[edge_of_slot], target_index)


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _envelope(distance, cutoff):
    """p(d) and dp/dd for p = (1 - x)^3 (1 + 3x + 6x^2), x = d / cutoff (the reference's ``envelope``,
    factored to keep its relative precision near the cutoff); both 0 beyond the cutoff."""
    x = tl.minimum(distance / cutoff, 1.0)
    remaining = 1.0 - x
    p = remaining * remaining * remaining * (1.0 + x * (3.0 + 6.0 * x))
    dp = -30.0 * x * x * remaining * remaining / cutoff
    return p, dp


@triton.jit
def _load_edge_geometry(R, edge, valid, cutoff):
    """Edge vector components rx, ry, rz, 1 / distance (1 on masked rows), p and p', all [BLOCK_R]."""
    rx = tl.load(R + edge * 3, mask=valid, other=0.0)
    ry = tl.load(R + edge * 3 + 1, mask=valid, other=0.0)
    rz = tl.load(R + edge * 3 + 2, mask=valid, other=0.0)
    distance = tl.where(valid, tl.sqrt(rx * rx + ry * ry + rz * rz), 1.0)
    p, dp = _envelope(distance, cutoff)
    return rx, ry, rz, 1.0 / distance, p, dp


@triton.jit
def _load_scalar_params(PARAMS):
    """cutoff, log(sink) and 1/sqrt(D), read from a tensor so they keep the compute precision."""
    return tl.load(PARAMS), tl.log(tl.load(PARAMS + 1)), tl.load(PARAMS + 2)


@triton.jit
def _tile_rows(PTR, N, H, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R consecutive (atom, head) rows and the atoms' CSR ranges.

    Row ``pair = atom * H + head`` indexes the [N, H, ...] tensors directly. Returns pair,
    atom, head, row_ok (pair < N * H), start = PTR[atom] and degree = PTR[atom + 1] - start,
    all [BLOCK_R] (int64 indices, degree 0 on rows past the end).
    """
    pair = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = pair < N * H
    atom = pair // H
    head = pair % H
    start = tl.load(PTR + atom, mask=row_ok, other=0).to(tl.int64)
    degree = tl.load(PTR + atom + 1, mask=row_ok, other=0).to(tl.int64) - start
    return pair, atom, head, row_ok, start, degree


@triton.jit
def _row_tile(row_offset, row_mask, width, BLOCK: tl.constexpr):
    """Offsets row_offset[r] + c and mask (row_mask[r] and c < width) of a [BLOCK_R, BLOCK] tile."""
    cols = tl.arange(0, BLOCK)
    return row_offset[:, None] + cols[None, :], row_mask[:, None] & (cols < width)[None, :]


@triton.jit
def _load_rows(X, row_offset, row_mask, width, BLOCK: tl.constexpr):
    """The [BLOCK_R, BLOCK] tile X[row_offset[r] + c], 0 on masked rows and on columns c >= width."""
    offsets, mask = _row_tile(row_offset, row_mask, width, BLOCK)
    return tl.load(X + offsets, mask=mask, other=0.0)


@triton.jit
def _store_rows(X, row_offset, row_mask, width, BLOCK: tl.constexpr, tile):
    """X[row_offset[r] + c] = tile[r, c] for the unmasked rows and the columns c < width."""
    offsets, mask = _row_tile(row_offset, row_mask, width, BLOCK)
    tl.store(X + offsets, tile, mask=mask)


# Tiles are 2-D, [BLOCK_R rows, BLOCK_D or BLOCK_V columns], one row per (atom, head) pair: the
# heads of an atom are consecutive rows, so the edge index, geometry and envelope of an edge are
# fetched once per program for all its heads (repeats are L1 hits), the per-(edge, head) scalars
# of one edge are contiguous, and the value rows of a source's heads are one contiguous block.
# The direction payload keeps its three components in three [BLOCK_R, BLOCK_V] tiles. (3-D tiles,
# and some 1-D row vectors, crash Triton 3.6's layout passes on sm_90: every default
# configuration is compiled for sm_90 on CPU by ``python -m benchmarks.kernel_configs --compile-only``.)

# ----------------------------------------------------------------------------- forward


@triton.jit
def _csr_step(SRC, src_next, row_start, degree, step):
    """Step `step` of a target-side loop over each row's CSR edges: valid, edge, its source (loaded
    the step before) and the next step's source, prefetched a step ahead."""
    valid = step < degree
    edge = row_start + step
    src = src_next.to(tl.int64)
    src_next = tl.load(SRC + edge + 1, mask=step + 1 < degree, other=0)
    return valid, edge, src, src_next


@triton.jit
def _target_row_step(K, V, R, SCALE, BIAS, VW, SRC, src_next, row_start, degree, step, head, H, D, VD, cutoff,
                     BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """Everything one step of a target-side loop reads for edge row_start + step of each row:
    valid, edge, the next step's source (prefetched), key [BLOCK_R, BLOCK_D], value [BLOCK_R, BLOCK_V],
    the edge scalars g, b, phi of the row's head and the edge geometry (_load_edge_geometry)."""
    valid, edge, src, src_next = _csr_step(SRC, src_next, row_start, degree, step)
    key = _load_rows(K, (src * H + head) * D, valid, D, BLOCK_D)
    val = _load_rows(V, (src * H + head) * VD, valid, VD, BLOCK_V)
    g = tl.load(SCALE + edge * H + head, mask=valid, other=0.0)
    b = tl.load(BIAS + edge * H + head, mask=valid, other=0.0)
    phi = tl.load(VW + edge * H + head, mask=valid, other=0.0)
    rx, ry, rz, inverse, p, dp = _load_edge_geometry(R, edge, valid, cutoff)
    return valid, edge, src_next, key, val, g, b, phi, rx, ry, rz, inverse, p, dp


@triton.jit
def _forward_kernel(
    Q, K, V, R, SCALE, BIAS, VW, ROW_PTR, SRC, PARAMS,  # inputs
    OUT, LSE,  # outputs: [N, A, H, V], [N, H]
    N, H: tl.constexpr, D: tl.constexpr, VD: tl.constexpr,
    DIRECTION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    EDGES_PER_STEP: tl.constexpr,
):
    pair, atom, head, row_ok, row_start, degree = _tile_rows(ROW_PTR, N, H, BLOCK_R)
    q = _load_rows(Q, pair * D, row_ok, D, BLOCK_D)
    cutoff, log_sink, qk_scale = _load_scalar_params(PARAMS)

    mu = tl.zeros([BLOCK_R], dtype=q.dtype) + log_sink  # the sink is the first neighbour
    z = tl.zeros([BLOCK_R], dtype=q.dtype) + 1.0
    acc_x = tl.zeros([BLOCK_R, BLOCK_V], dtype=q.dtype)  # a = 0 (the only row for 1/|r|)
    acc_y = tl.zeros([BLOCK_R, BLOCK_V], dtype=q.dtype)
    acc_z = tl.zeros([BLOCK_R, BLOCK_V], dtype=q.dtype)
    src_next = tl.load(SRC + row_start, mask=degree > 0, other=0)
    for first in range(0, tl.max(degree, axis=0), EDGES_PER_STEP):
        for offset in tl.static_range(EDGES_PER_STEP):  # unrolled: the steps' loads can be in flight together
            valid, edge, src_next, key, val, g, b, phi, rx, ry, rz, inverse, p, dp = _target_row_step(
                K, V, R, SCALE, BIAS, VW, SRC, src_next, row_start, degree, first + offset, head, H, D, VD, cutoff,
                BLOCK_D, BLOCK_V)

            # edges with p = 0 (at the cutoff in this precision) add nothing and stay out of the max
            s = tl.where(valid & (p > 0.0), g * tl.sum(q * key, axis=1) * qk_scale + b, float("-inf"))
            mu_new = tl.maximum(mu, s)
            rescale = tl.exp(mu - mu_new)
            w = tl.where(valid, p * tl.exp(s - mu_new), 0.0)
            z = z * rescale + w
            coefficient = w * phi * inverse  # P phi / |r| (unnormalised): times r_a for the direction
            if DIRECTION:
                acc_x = acc_x * rescale[:, None] + (coefficient * rx)[:, None] * val
                acc_y = acc_y * rescale[:, None] + (coefficient * ry)[:, None] * val
                acc_z = acc_z * rescale[:, None] + (coefficient * rz)[:, None] * val
            else:
                acc_x = acc_x * rescale[:, None] + coefficient[:, None] * val
            mu = mu_new

    out_offset = (atom * H * (3 if DIRECTION else 1) + head) * VD  # row a = 0; rows a are H * VD apart
    inverse_z = (1.0 / z)[:, None]
    _store_rows(OUT, out_offset, row_ok, VD, BLOCK_V, acc_x * inverse_z)
    if DIRECTION:
        _store_rows(OUT, out_offset + H * VD, row_ok, VD, BLOCK_V, acc_y * inverse_z)
        _store_rows(OUT, out_offset + 2 * H * VD, row_ok, VD, BLOCK_V, acc_z * inverse_z)
    tl.store(LSE + pair, mu + tl.log(z), mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _backward_edge_kernel(
    Q, K, V, R, SCALE, BIAS, VW, SRC, TGT, PARAMS, LSE, DELTA, DOUT,  # inputs
    DSCALE, DBIAS, DVW, DR_PER_HEAD,  # outputs: 3 x [E, H], [E, H, 3]
    E, H: tl.constexpr, D: tl.constexpr, VD: tl.constexpr,
    DIRECTION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    EDGES_PER_STEP: tl.constexpr,
):
    """Everything that belongs to one (edge, head): no loop, no reduction. A program owns
    EDGES_PER_STEP consecutive tiles of BLOCK_R rows, row = edge * H + head, so the per-(edge, head)
    scalars are read and written contiguously and the target's rows (q_i, dOut_i, lse_i, Delta_i) of
    consecutive edges repeat (cache hits); only k_j and v_j are gathered at random."""
    cutoff, log_sink_unused, qk_scale = _load_scalar_params(PARAMS)
    for part in tl.static_range(EDGES_PER_STEP):
        row = (tl.program_id(0).to(tl.int64) * EDGES_PER_STEP + part) * BLOCK_R + tl.arange(0, BLOCK_R)
        valid = row < E * H
        edge = row // H
        head = row % H
        src = tl.load(SRC + edge, mask=valid, other=0).to(tl.int64)
        tgt = tl.load(TGT + edge, mask=valid, other=0).to(tl.int64)
        target_row = tgt * H + head
        q = _load_rows(Q, target_row * D, valid, D, BLOCK_D)
        key = _load_rows(K, (src * H + head) * D, valid, D, BLOCK_D)
        val = _load_rows(V, (src * H + head) * VD, valid, VD, BLOCK_V)
        g = tl.load(SCALE + row, mask=valid, other=0.0)
        b = tl.load(BIAS + row, mask=valid, other=0.0)
        phi = tl.load(VW + row, mask=valid, other=0.0)
        lse = tl.load(LSE + target_row, mask=valid, other=0.0)
        delta = tl.load(DELTA + target_row, mask=valid, other=0.0)
        rx, ry, rz, inverse, p, dp = _load_edge_geometry(R, edge, valid, cutoff)
        ux, uy, uz = rx * inverse, ry * inverse, rz * inverse

        # dOut rows a = 0, 1, 2 (only 0 for 1/|r|) are H * VD apart
        grad_offset = (tgt * H * (3 if DIRECTION else 1) + head) * VD
        c_x = tl.sum(_load_rows(DOUT, grad_offset, valid, VD, BLOCK_V) * val, axis=1)  # c_a = <dOut_a, v_j>
        if DIRECTION:
            c_y = tl.sum(_load_rows(DOUT, grad_offset + H * VD, valid, VD, BLOCK_V) * val, axis=1)
            c_z = tl.sum(_load_rows(DOUT, grad_offset + 2 * H * VD, valid, VD, BLOCK_V) * val, axis=1)
            c = ux * c_x + uy * c_y + uz * c_z
        else:
            c = c_x * inverse

        qk = tl.sum(q * key, axis=1)
        # P_e / p_e, 0 where p = 0 as in the forward: exp(s - lse) is bounded by 1 / p only while p > 0
        unenveloped = tl.where(valid & (p > 0.0), tl.exp(g * qk * qk_scale + b - lse), 0.0)
        prob = p * unenveloped
        d_logit = prob * (phi * c - delta)
        tl.store(DSCALE + row, d_logit * qk * qk_scale, mask=valid)
        tl.store(DBIAS + row, d_logit, mask=valid)
        tl.store(DVW + row, prob * c, mask=valid)

        d_distance = unenveloped * (phi * c - delta) * dp
        if DIRECTION:  # d u_a = P phi c_a; d(r/|r|)/dr = (1 - r_hat r_hat^T) / |r|
            weight = prob * phi
            radial = weight * c
            drx = d_distance * ux + (weight * c_x - ux * radial) * inverse
            dry = d_distance * uy + (weight * c_y - uy * radial) * inverse
            drz = d_distance * uz + (weight * c_z - uz * radial) * inverse
        else:  # d(1/|r|)/dr = -r_hat / |r|^2
            along = d_distance - prob * phi * c_x * inverse * inverse
            drx, dry, drz = along * ux, along * uy, along * uz
        tl.store(DR_PER_HEAD + row * 3, drx, mask=valid)
        tl.store(DR_PER_HEAD + row * 3 + 1, dry, mask=valid)
        tl.store(DR_PER_HEAD + row * 3 + 2, drz, mask=valid)


@triton.jit
def _backward_target_kernel(
    K, SCALE, ROW_PTR, SRC, PARAMS, DBIAS,  # inputs (DBIAS = d logit from the edge kernel)
    DQ,  # output: [N, H, D]
    N, H: tl.constexpr, D: tl.constexpr, VD: tl.constexpr,
    DIRECTION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    EDGES_PER_STEP: tl.constexpr,
):
    """d query_i = sum_e d logit_e g_e / sqrt(D) k_j, over the target's CSR row (the forward's tiling)."""
    pair, atom, head, row_ok, row_start, degree = _tile_rows(ROW_PTR, N, H, BLOCK_R)
    cutoff_unused, log_sink_unused, qk_scale = _load_scalar_params(PARAMS)
    dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=qk_scale.dtype)
    src_next = tl.load(SRC + row_start, mask=degree > 0, other=0)
    for first in range(0, tl.max(degree, axis=0), EDGES_PER_STEP):
        for offset in tl.static_range(EDGES_PER_STEP):  # unrolled: the steps' loads can be in flight together
            valid, edge, src, src_next = _csr_step(SRC, src_next, row_start, degree, first + offset)
            key = _load_rows(K, (src * H + head) * D, valid, D, BLOCK_D)
            g = tl.load(SCALE + edge * H + head, mask=valid, other=0.0)
            d_logit = tl.load(DBIAS + edge * H + head, mask=valid, other=0.0)
            dq += (d_logit * g * qk_scale)[:, None] * key
    _store_rows(DQ, pair * D, row_ok, D, BLOCK_D, dq)


@triton.jit
def _backward_source_kernel(
    Q, K, R, SCALE, BIAS, VW, COL_PTR, EDGE_OF_SLOT, TARGET_OF_SLOT, PARAMS, LSE, DOUT, DBIAS,  # inputs
    DK, DV,  # outputs: [N, H, D], [N, H, V]
    N, H: tl.constexpr, D: tl.constexpr, VD: tl.constexpr,
    DIRECTION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    EDGES_PER_STEP: tl.constexpr,
):
    pair, atom, head, row_ok, slot_start, degree = _tile_rows(COL_PTR, N, H, BLOCK_R)
    key = _load_rows(K, pair * D, row_ok, D, BLOCK_D)
    cutoff, log_sink_unused, qk_scale = _load_scalar_params(PARAMS)

    dk = tl.zeros([BLOCK_R, BLOCK_D], dtype=key.dtype)
    dv = tl.zeros([BLOCK_R, BLOCK_V], dtype=key.dtype)
    edge_next = tl.load(EDGE_OF_SLOT + slot_start, mask=degree > 0, other=0)
    tgt_next = tl.load(TARGET_OF_SLOT + slot_start, mask=degree > 0, other=0)
    for first in range(0, tl.max(degree, axis=0), EDGES_PER_STEP):
        for offset in tl.static_range(EDGES_PER_STEP):  # unrolled: the steps' loads can be in flight together
            step = first + offset
            valid = step < degree
            slot = slot_start + step
            edge = edge_next.to(tl.int64)
            tgt = tgt_next.to(tl.int64)
            edge_next = tl.load(EDGE_OF_SLOT + slot + 1, mask=step + 1 < degree, other=0)  # prefetched a step ahead
            tgt_next = tl.load(TARGET_OF_SLOT + slot + 1, mask=step + 1 < degree, other=0)
            q = _load_rows(Q, (tgt * H + head) * D, valid, D, BLOCK_D)
            lse = tl.load(LSE + tgt * H + head, mask=valid, other=0.0)
            g = tl.load(SCALE + edge * H + head, mask=valid, other=0.0)
            b = tl.load(BIAS + edge * H + head, mask=valid, other=0.0)
            phi = tl.load(VW + edge * H + head, mask=valid, other=0.0)
            d_logit = tl.load(DBIAS + edge * H + head, mask=valid, other=0.0)  # written by the edge kernel
            rx, ry, rz, inverse, p, dp = _load_edge_geometry(R, edge, valid, cutoff)

            prob = tl.where(valid & (p > 0.0), p * tl.exp(g * tl.sum(q * key, axis=1) * qk_scale + b - lse), 0.0)
            weight = prob * phi * inverse  # times r_a for the direction payload, alone for 1/|r|
            grad_offset = (tgt * H * (3 if DIRECTION else 1) + head) * VD  # dOut[tgt, a = 0, head]
            grad_x = _load_rows(DOUT, grad_offset, valid, VD, BLOCK_V)
            if DIRECTION:  # sum_a u_a dOut[a]; rows a are H * VD apart
                grad_y = _load_rows(DOUT, grad_offset + H * VD, valid, VD, BLOCK_V)
                grad_z = _load_rows(DOUT, grad_offset + 2 * H * VD, valid, VD, BLOCK_V)
                dv += (weight * rx)[:, None] * grad_x + (weight * ry)[:, None] * grad_y + (weight * rz)[:, None] * grad_z
            else:
                dv += weight[:, None] * grad_x
            dk += (d_logit * g * qk_scale)[:, None] * q

    _store_rows(DK, pair * D, row_ok, D, BLOCK_D, dk)
    _store_rows(DV, pair * VD, row_ok, VD, BLOCK_V, dv)


# ----------------------------------------------------------------------------- launch configuration


class LaunchConfig(NamedTuple):
    """Launch knobs of one kernel: (atom, head) rows per program, warps per program, and neighbour
    steps unrolled per loop iteration.

    There is no num_stages knob: these loops contain no tl.dot, so Triton 3.6 does not pipeline
    them and emits the same PTX for every num_stages (checked for sm_90). Unrolling is the manual
    substitute: with `edges_per_step` > 1 the gathers of consecutive neighbour steps sit in one
    basic block, where the compiler may issue them before the arithmetic of the first step.
    """

    block_rows: int
    num_warps: int
    edges_per_step: int = 1


KERNELS = ("forward", "edge", "target", "source")
CONFIG_ENV = "E2FORMER_ATTENTION_CONFIG"

# Defaults for BLOCK_V <= 64 by (kernel, payload, bytes per float), float32 chosen from timings on an
# H200 (``python -m benchmarks.kernel_configs``, see BENCHMARKS.md "Launch configurations"): each
# configuration timed per kernel on the benchmark shape (H=16, D=16, V=64, K=64), the water_small shape
# (H=16, D=8, V=36, K=32) and the paper shape (H=128, D=8, V=18, K=32) at 8-32k atoms, and at 648-2048
# atoms (water MD, small benchmark). 2026-12-02: 16 or 32 rows x 2 or 4 warps x 1, 2 or 4 neighbour
# steps; then 8-row tiles (8x1, 8x1x2, 8x2), which won almost everywhere: more, lighter programs in
# flight hide the latency of the gathers. Each entry is the one whose slowest shape is closest to that
# shape's fastest configuration. Retimed after H, D and V became compile-time constants (seven
# configurations, four shapes; kernel_configs_constexpr_sweep_h200.json): source 8x1x2 (within 4% of the
# fastest on every shape), d query 16x2x2 for the direction (within 10%), forward 8x1 (the benchmark and
# paper shapes' fastest; +4% on water MD, +19% on water_small), edge 8x1 (within 6%). Inverse distance: the
# benchmark shape only. Float64 keeps "16x8" (16 rows, 8 warps), which compiled for every tested shape
# spilling at most ~100 bytes (direction): untimed, and the fallback. Rows halve for every doubling of
# BLOCK_V above 64, down to 16 (or the entry's rows, if fewer).
DEFAULT_CONFIGS = {
    ("forward", "inverse_distance", 4): LaunchConfig(16, 2),
    ("forward", "direction", 4): LaunchConfig(8, 1),
    ("edge", "inverse_distance", 4): LaunchConfig(8, 1, edges_per_step=2),
    ("edge", "direction", 4): LaunchConfig(8, 1),
    ("target", "inverse_distance", 4): LaunchConfig(8, 1, edges_per_step=2),
    ("target", "direction", 4): LaunchConfig(16, 2, edges_per_step=2),
    ("source", "inverse_distance", 4): LaunchConfig(8, 1, edges_per_step=2),
    ("source", "direction", 4): LaunchConfig(8, 1, edges_per_step=2),
    **{(kernel, payload, 8): LaunchConfig(16, 8) for kernel in KERNELS for payload in PAYLOAD_WIDTH},
}


def _default_config(kernel: str, payload: str, block_v: int, itemsize: int) -> LaunchConfig:
    """The table entry, with fewer rows for value widths above 64 (the tiles grow with BLOCK_V)."""
    config = DEFAULT_CONFIGS[kernel, payload, itemsize]
    fewest = min(16, config.block_rows)
    return config._replace(block_rows=max(fewest, config.block_rows * 64 // max(block_v, 64)))


def _parse_config_override(text: str) -> dict:
    """``ROWSxWARPS[xEDGES]`` for all kernels, or ``forward=64x4x2,source=32x8`` per kernel -> {kernel: LaunchConfig}."""
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kernel, _, spec = item.rpartition("=")
        numbers = [int(number) for number in spec.split("x")]
        if len(numbers) not in (2, 3):
            raise ValueError(f"{CONFIG_ENV}: expected ROWSxWARPS or ROWSxWARPSxEDGES, got {item!r}")
        config = LaunchConfig(*numbers)
        if any(number < 1 or number & (number - 1) for number in config):
            raise ValueError(f"{CONFIG_ENV}: rows, warps and edges per step must be powers of two, got {item!r}")
        for name in [kernel] if kernel else KERNELS:
            if name not in KERNELS:
                raise ValueError(f"{CONFIG_ENV}: unknown kernel {name!r} (one of {KERNELS})")
            overrides[name] = config
    return overrides


def _launch_config(kernel, num_rows, num_heads, head_dim, value_dim, payload, dtype):
    """Grid and meta-parameters of a launch: one program per BLOCK_R consecutive (atom, head) rows,
    num_rows = N atoms, or for the edge kernel per EDGES_PER_STEP x BLOCK_R (edge, head) rows, num_rows = E.

    The knobs come from DEFAULT_CONFIGS unless the environment variable E2FORMER_ATTENTION_CONFIG
    overrides them, e.g. ``16x8`` (the fallback) for all kernels or ``target=16x8x2`` for one.
    """
    return _cached_launch_config(kernel, num_rows, num_heads, head_dim, value_dim, payload, dtype,
                                 os.environ.get(CONFIG_ENV, ""))


@functools.lru_cache(maxsize=256)
def _cached_launch_config(kernel, num_rows, num_heads, head_dim, value_dim, payload, dtype, override):
    """``_launch_config`` for one value of the override variable, cached: building it costs ~20 µs
    of host time, which at small N is comparable to a kernel's GPU time."""
    block_v = triton.next_power_of_2(value_dim)
    config = _parse_config_override(override).get(kernel)
    config = config or _default_config(kernel, payload, block_v, torch.finfo(dtype).bits // 8)
    meta = dict(
        DIRECTION=payload == "direction", BLOCK_R=config.block_rows, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_V=block_v, EDGES_PER_STEP=config.edges_per_step, num_warps=config.num_warps,
    )
    rows_per_program = config.block_rows * (config.edges_per_step if kernel == "edge" else 1)
    return (triton.cdiv(num_rows * num_heads, rows_per_program),), meta


# ----------------------------------------------------------------------------- launches + autograd


class AttentionInputs(NamedTuple):
    """Contiguous inputs of one call, as the kernels take them (shapes as in ``neighbor_attention``)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    edge_vector: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor
    value_weight: torch.Tensor
    row_ptr: torch.Tensor
    source_index: torch.Tensor
    params: torch.Tensor  # [3] cutoff, sink, 1/sqrt(D) in the compute dtype
    payload: str

    def sizes(self):
        """(N, H, D, V), the runtime sizes every kernel takes."""
        return (*self.query.shape, self.value.shape[-1])

    def launch_config(self, kernel):
        return _launch_config(kernel, *self.sizes(), self.payload, self.query.dtype)


def attention_inputs(query, key, value, edge_vector, logit_scale, logit_bias, value_weight,
                     row_ptr, source_index, cutoff, payload, sink) -> AttentionInputs:
    """Pack (contiguous) inputs; cutoff, sink and 1/sqrt(D) go into a tensor of the compute dtype."""
    floats = (t.contiguous() for t in (query, key, value, edge_vector, logit_scale, logit_bias, value_weight))
    params = _scalar_params(cutoff, sink, query.shape[-1], query.device, query.dtype)
    return AttentionInputs(*floats, row_ptr.contiguous(), source_index.contiguous(), params, payload)


@functools.lru_cache(maxsize=64)
def _scalar_params(cutoff: float, sink: float, head_dim: int, device: torch.device, dtype: torch.dtype):
    """[3] cutoff, sink, 1/sqrt(D) on the device, cached: a host-to-device copy per call costs more
    than the whole kernel at small N. Read-only."""
    return torch.tensor([cutoff, sink, head_dim**-0.5], dtype=torch.float64).to(device, dtype)


def launch_forward(inputs: AttentionInputs):
    """Run ``_forward_kernel``: out [N, A, H, V] and lse [N, H]."""
    num_nodes, num_heads, _, value_dim = inputs.sizes()
    out = inputs.query.new_empty(num_nodes, PAYLOAD_WIDTH[inputs.payload], num_heads, value_dim)
    lse = inputs.query.new_empty(num_nodes, num_heads)
    grid, meta = inputs.launch_config("forward")
    _forward_kernel[grid](*inputs[:10], out, lse, *inputs.sizes(), **meta)
    return out, lse


def launch_backward_edges(inputs: AttentionInputs, transpose: TransposedNeighbors, out, lse, grad_out):
    """Run ``_backward_edge_kernel``: d logit_scale, d logit_bias, d value_weight [E, H] and the
    per-head parts of d edge_vector [E, H, 3]."""
    num_edges, num_heads = inputs.logit_scale.shape
    delta = (grad_out * out).sum(dim=(1, 3))  # [N, H] FlashAttention-2's row term
    d_scale, d_bias, d_value_weight = (torch.empty_like(inputs.logit_scale) for _ in range(3))
    d_edge_vector_per_head = inputs.edge_vector.new_empty(num_edges, num_heads, 3)
    grid, meta = _launch_config("edge", num_edges, *inputs.sizes()[1:], inputs.payload, inputs.query.dtype)
    _backward_edge_kernel[grid](
        *inputs[:7], inputs.source_index, transpose.target_of_edge, inputs.params, lse, delta, grad_out,
        d_scale, d_bias, d_value_weight, d_edge_vector_per_head, num_edges, *inputs.sizes()[1:], **meta,
    )
    return d_scale, d_bias, d_value_weight, d_edge_vector_per_head


def launch_backward_target(inputs: AttentionInputs, d_bias):
    """Run ``_backward_target_kernel``: d query [N, H, D] (d_bias from the edge kernel)."""
    d_query = torch.empty_like(inputs.query)
    grid, meta = inputs.launch_config("target")
    _backward_target_kernel[grid](
        inputs.key, inputs.logit_scale, inputs.row_ptr, inputs.source_index, inputs.params, d_bias,
        d_query, *inputs.sizes(), **meta,
    )
    return d_query


def launch_backward_source(inputs: AttentionInputs, transpose: TransposedNeighbors, lse, grad_out, d_bias):
    """Run ``_backward_source_kernel``: d key [N, H, D] and d value [N, H, V] (d_bias from the edge kernel)."""
    d_key = torch.empty_like(inputs.key)
    d_value = torch.empty_like(inputs.value)
    grid, meta = inputs.launch_config("source")
    _backward_source_kernel[grid](
        inputs.query, inputs.key, inputs.edge_vector, inputs.logit_scale, inputs.logit_bias, inputs.value_weight,
        transpose.col_ptr, transpose.edge_of_slot, transpose.target_of_slot, inputs.params, lse, grad_out, d_bias,
        d_key, d_value, *inputs.sizes(), **meta,
    )
    return d_key, d_value


class NeighborAttentionFunction(torch.autograd.Function):
    """Triton forward and backward; differentiable once (backward is not differentiable)."""

    @staticmethod
    def forward(ctx, query, key, value, edge_vector, logit_scale, logit_bias, value_weight,
                row_ptr, source_index, transpose, cutoff, payload, sink):
        inputs = attention_inputs(query, key, value, edge_vector, logit_scale, logit_bias, value_weight,
                                  row_ptr, source_index, cutoff, payload, sink)
        out, lse = launch_forward(inputs)
        ctx.save_for_backward(*inputs[:10], out, lse)
        ctx.transpose = transpose
        ctx.payload = payload
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        *saved, out, lse = ctx.saved_tensors
        inputs = AttentionInputs(*saved, ctx.payload)
        grad_out = grad_out.contiguous()
        transpose = ctx.transpose if ctx.transpose is not None else transpose_neighbors(inputs.row_ptr, inputs.source_index)
        d_scale, d_bias, d_value_weight, d_edge_vector_per_head = launch_backward_edges(inputs, transpose, out, lse, grad_out)
        d_query = launch_backward_target(inputs, d_bias)
        d_key, d_value = launch_backward_source(inputs, transpose, lse, grad_out, d_bias)
        return (d_query, d_key, d_value, d_edge_vector_per_head.sum(1), d_scale, d_bias, d_value_weight,
                None, None, None, None, None, None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter calls int() on 1-element arrays for ``range(0, runtime_value)``,
    which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream): apply the upstream fix."""
    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_with_scalar_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor_with_scalar_index


if _interpreting():
    _patch_interpreter_loop_bounds()


# Opaque to torch.compile (E2FormerV2.compile_blocks compiles around it): the kernels are fused already, and
# their launch (configuration table, transposed graph) is host code that would only break the traced graph.
@torch.compiler.disable
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
