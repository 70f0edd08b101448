"""The tensor product x ⊗ ℛ^{lf}(r) of node features with a solid harmonic, by EAAS.

For node features x [N, (l_in+1)^2, C] and one vector r_n per row, every path (l1, lf, l3)
with |l1 - lf| <= l3 <= min(l1 + lf, l_out) gives

    out^(l1,l3)[n, m3, c] = sum_{m1, mf} CG(l1, lf, l3)[m1, mf, m3] x[n, l1 m1, c] ℛ^lf_mf(r_n),

with ℛ^lf(r) = |r|^lf Y_lf(r̂) (`so3.spherical_harmonics(lf, r, normalize=False)`) and no path
normalisation. Paths are ordered by l1, then l3; their output blocks are concatenated along
rows in that order (`tensor_product_paths` gives each block's row slice). Per row n the
product is a linear map of the channels' columns, out[n] = T_n x[n] with T_n [R_out, R_in].

EAAS (paper §4.3, App. B). The product is equivariant, so with D = D(R) for the rotation R
that puts r on the pole (+y here, e3nn's polar axis):

    x ⊗ ℛ(r) = D^T [ (D x) ⊗ ℛ(|r| e_y) ].

At the pole ℛ(|r| e_y) = |r|^lf sqrt(2lf+1) δ_{mf,0}, and the CG slice at mf = 0 has at most
one non-zero per output row m3, at m1 = m3 if l1 + lf + l3 is even, m1 = -m3 if odd. So the
middle step is a gather of one input row per output row times a constant. That table is
generated here from the CG tensor (`pole_reindexing`), not typed in.
The three steps (rotate in, re-index, rotate back) are composed on the small per-row matrices,
T_n = D_out^T P_n D_in (`eaas_operator`), and T_n is applied to all C channels with one batched
matmul: the wide tensors are read once and written once instead of once per step.

Autograd. The frame R depends on r through angles whose derivatives blow up at the poles and
at r = 0, although T_n is a polynomial in r. So we never differentiate through R: the product
is an autograd.Function whose backward uses the structure instead:
  - d/dx: the transpose T_n^T g (another Function, whose own backward is the product again);
  - d/dr: T(r) = K · r^{⊗lf} with the constant tensor K = CG · A_lf (ℛ(r) = A_lf r^{⊗lf}),
    so ∇_r <g, T(r) x> = lf · <g x^T, K(·, r, ..., r)>: plain tensor ops.
Both are built from differentiable operations and these two Functions, so double backward
(forces in the loss) works.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from e2former_calc.models.so3 import clebsch_gordan, pole_alignment, solid_harmonics_tensor, spherical_harmonics

__all__ = [
    "TensorProductPath",
    "tensor_product_paths",
    "pole_reindexing",
    "coupling_tensor",
    "dense_operator",
    "dense_tensor_product",
    "eaas_operator",
    "eaas_tensor_product",
    "EAASTensorProduct",
]


@dataclass(frozen=True)
class TensorProductPath:
    """One coupling l1 ⊗ l_filter -> l3 and the rows of its block in the output."""

    l1: int
    l_filter: int
    l3: int
    rows: slice


@functools.lru_cache(maxsize=None)
def tensor_product_paths(l_in: int, l_filter: int, l_out: int) -> tuple[TensorProductPath, ...]:
    """All paths of x (degrees 0..l_in) ⊗ ℛ^l_filter into degrees <= l_out, ordered by (l1, l3)."""
    paths, start = [], 0
    for l1 in range(l_in + 1):
        for l3 in range(abs(l1 - l_filter), min(l1 + l_filter, l_out) + 1):
            paths.append(TensorProductPath(l1, l_filter, l3, slice(start, start + 2 * l3 + 1)))
            start += 2 * l3 + 1
    if not paths:
        raise ValueError(f"no path couples degrees <= {l_in} and {l_filter} into degrees <= {l_out}")
    return tuple(paths)


@functools.lru_cache(maxsize=None)
def _coupling_tensor_f64(l_in: int, l_filter: int, l_out: int) -> torch.Tensor:
    paths = tensor_product_paths(l_in, l_filter, l_out)
    coupling = torch.zeros((l_in + 1) ** 2, 2 * l_filter + 1, paths[-1].rows.stop, dtype=torch.float64)
    for p in paths:
        coupling[p.l1**2 : (p.l1 + 1) ** 2, :, p.rows] = clebsch_gordan(p.l1, l_filter, p.l3)
    return coupling


@functools.lru_cache(maxsize=None)
def coupling_tensor(l_in: int, l_filter: int, l_out: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """All paths' CG tensors in one block-sparse tensor [R_in, 2lf+1, R_out] (shared, read-only)."""
    return _coupling_tensor_f64(l_in, l_filter, l_out).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _pole_reindexing_f64(l_in: int, l_filter: int, l_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    pole = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    # operator[k, i] = sum_mf CG[i, mf, k] ℛ_mf(e_y); ℛ(e_y) has only its mf = 0 entry
    operator = torch.einsum("ifk,f->ki", _coupling_tensor_f64(l_in, l_filter, l_out), spherical_harmonics(l_filter, pole))
    sources, coefficients = [], []
    for row in operator:
        nonzero = (row.abs() > 1e-12).nonzero().flatten().tolist()
        if len(nonzero) > 1:
            raise RuntimeError("the CG contraction at the pole is not a re-indexing")
        source = nonzero[0] if nonzero else 0
        sources.append(source)
        coefficients.append(row[source].item() if nonzero else 0.0)
    return torch.tensor(sources), torch.tensor(coefficients, dtype=torch.float64)


def pole_reindexing(l_in: int, l_filter: int, l_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The EAAS re-indexing operator at the pole for |r| = 1, generated from the CG tensors.

    Returns (source_rows [R_out] long, coefficients [R_out] float64): in the aligned frame,
    output row k = coefficients[k] * |r|^lf * input row source_rows[k], in the [N, R_out, C]
    and [N, (l_in+1)^2, C] layouts (coefficient 0 where the output row vanishes at the pole).
    """
    sources, coefficients = _pole_reindexing_f64(l_in, l_filter, l_out)
    return sources.clone(), coefficients.clone()


@functools.lru_cache(maxsize=None)
def _pole_tables(l_in, l_filter, l_out, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    sources, coefficients = _pole_reindexing_f64(l_in, l_filter, l_out)
    return sources.to(device), coefficients.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _filter_gradient_tensor(l_in, l_filter, l_out, dtype, device) -> torch.Tensor:
    """K [R_out, R_in, 3, ..., 3] (l_filter spatial indices) with T(r) = K · r^{⊗lf}."""
    coupling = coupling_tensor(l_in, l_filter, l_out, dtype, device)
    return torch.einsum("ifk,f...->ki...", coupling, solid_harmonics_tensor(l_filter, dtype, device))


def _check_shapes(x: torch.Tensor, vectors: torch.Tensor, l_in: int) -> None:
    if x.dim() != 3 or x.shape[1] != (l_in + 1) ** 2 or vectors.shape != (x.shape[0], 3):
        raise ValueError(f"expected x [N, {(l_in + 1) ** 2}, C] and vectors [N, 3], got {tuple(x.shape)}, {tuple(vectors.shape)}")


# --------------------------------------------------------------------------------------
# Dense reference
# --------------------------------------------------------------------------------------


def dense_operator(vectors: torch.Tensor, l_in: int, l_filter: int, l_out: int) -> torch.Tensor:
    """T_n [N, R_out, R_in] = sum_mf CG[:, mf, :]^T ℛ_mf(r_n), by plain einsum (differentiable)."""
    filt = spherical_harmonics(l_filter, vectors, normalize=False)  # [N, 2lf+1]
    return torch.einsum("ifk,nf->nki", coupling_tensor(l_in, l_filter, l_out, vectors.dtype, vectors.device), filt)


def dense_tensor_product(x: torch.Tensor, vectors: torch.Tensor, l_in: int, l_filter: int, l_out: int) -> torch.Tensor:
    """The same product by direct CG contraction (the reference and a baseline).

    x: [N, (l_in+1)^2, C], vectors: [N, 3] (Å). Returns [N, R_out, C] in `tensor_product_paths` order.
    """
    _check_shapes(x, vectors, l_in)
    return dense_operator(vectors, l_in, l_filter, l_out) @ x


# --------------------------------------------------------------------------------------
# EAAS
# --------------------------------------------------------------------------------------


def eaas_operator(vectors: torch.Tensor, l_in: int, l_filter: int, l_out: int, dtype=None) -> torch.Tensor:
    """T_n [N, R_out, R_in] by EAAS: rotate in, re-index at the pole, rotate back. No autograd.

    Frames are built in float64 from `vectors` (Å); the result is cast to `dtype` (default:
    the dtype of `vectors`). Equal to `dense_operator` (tested), but never differentiated.
    """
    dtype = dtype or vectors.dtype
    vectors = vectors.detach()
    paths = tensor_product_paths(l_in, l_filter, l_out)
    wigner = [d.to(dtype) for d in pole_alignment(vectors, max(l_in, l_out))]
    sources, coefficients = _pole_tables(l_in, l_filter, l_out, dtype, vectors.device)

    rotate_in = torch.zeros(len(vectors), (l_in + 1) ** 2, (l_in + 1) ** 2, dtype=dtype, device=vectors.device)
    for l in range(l_in + 1):
        rotate_in[:, l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] = wigner[l]
    radial = vectors.to(dtype).norm(dim=-1) ** l_filter  # [N]
    at_pole = rotate_in[:, sources] * (coefficients[None, :, None] * radial[:, None, None])  # [N, R_out, R_in]
    return torch.cat([wigner[p.l3].transpose(-1, -2) @ at_pole[:, p.rows] for p in paths], dim=1)


@dataclass(frozen=True)
class _Problem:
    """What a product and all its derivatives share: the degrees and the operator T_n."""

    l_in: int
    l_filter: int
    l_out: int
    operator: torch.Tensor  # [N, R_out, R_in], from `eaas_operator`, no autograd history


def _vector_gradient(x: torch.Tensor, g: torch.Tensor, vectors: torch.Tensor, problem: _Problem) -> torch.Tensor:
    """∇_r <g, T(r) x> [N, 3] from differentiable ops: lf · <g x^T, K(·, r, ..., r)>."""
    k = _filter_gradient_tensor(problem.l_in, problem.l_filter, problem.l_out, x.dtype, x.device)
    gradient = torch.einsum("nki,ki...->n...", g @ x.transpose(1, 2), k)  # [N, 3, ..., 3]
    for _ in range(problem.l_filter - 1):
        gradient = torch.einsum("n...b,nb->n...", gradient, vectors)
    return problem.l_filter * gradient


class _EAASProduct(torch.autograd.Function):
    """(x, r) -> T(r) x with T from the frame, differentiated through the structure only."""

    @staticmethod
    def forward(ctx, x, vectors, problem):
        ctx.save_for_backward(x, vectors)
        ctx.problem = problem
        return problem.operator @ x

    @staticmethod
    def backward(ctx, grad_out):
        x, vectors = ctx.saved_tensors
        grad_x = _EAASTranspose.apply(grad_out, vectors, ctx.problem) if ctx.needs_input_grad[0] else None
        grad_r = _vector_gradient(x, grad_out, vectors, ctx.problem) if ctx.needs_input_grad[1] else None
        return grad_x, grad_r, None


class _EAASTranspose(torch.autograd.Function):
    """(g, r) -> T(r)^T g, the gradient of the product with respect to x."""

    @staticmethod
    def forward(ctx, g, vectors, problem):
        ctx.save_for_backward(g, vectors)
        ctx.problem = problem
        return problem.operator.transpose(1, 2) @ g

    @staticmethod
    def backward(ctx, grad_out):
        # <h, T^T g> = <T h, g>
        g, vectors = ctx.saved_tensors
        grad_g = _EAASProduct.apply(grad_out, vectors, ctx.problem) if ctx.needs_input_grad[0] else None
        grad_r = _vector_gradient(grad_out, g, vectors, ctx.problem) if ctx.needs_input_grad[1] else None
        return grad_g, grad_r, None


def eaas_tensor_product(x: torch.Tensor, vectors: torch.Tensor, l_in: int, l_filter: int, l_out: int) -> torch.Tensor:
    """x ⊗ ℛ^l_filter(vectors) by EAAS; same result and layout as `dense_tensor_product`.

    x: [N, (l_in+1)^2, C], vectors: [N, 3] (Å), same dtype. Returns [N, R_out, C] with blocks in
    `tensor_product_paths(l_in, l_filter, l_out)` order. Differentiable in x and vectors to any
    order, exactly also on the poles and at r = 0 (the frame itself is never differentiated).
    """
    _check_shapes(x, vectors, l_in)
    problem = _Problem(l_in, l_filter, l_out, eaas_operator(vectors, l_in, l_filter, l_out, x.dtype))
    return _EAASProduct.apply(x, vectors, problem)


class EAASTensorProduct(nn.Module):
    """Module form of `eaas_tensor_product` for fixed degrees (no parameters)."""

    def __init__(self, l_in: int, l_filter: int, l_out: int):
        super().__init__()
        self.l_in, self.l_filter, self.l_out = l_in, l_filter, l_out
        self.paths = tensor_product_paths(l_in, l_filter, l_out)

    @property
    def num_rows(self) -> int:
        """R_out, the rows of the output."""
        return self.paths[-1].rows.stop

    def path_rows(self) -> list[slice]:
        """Row slice of each path's block in the output, in path order."""
        return [path.rows for path in self.paths]

    def forward(self, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return eaas_tensor_product(x, vectors, self.l_in, self.l_filter, self.l_out)

    def extra_repr(self) -> str:
        return f"l_in={self.l_in}, l_filter={self.l_filter}, l_out={self.l_out}"
