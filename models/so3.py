"""SO(3) building blocks: real spherical harmonics, Wigner-D matrices, Clebsch–Gordan tensors.

Conventions are e3nn 0.6's (e3nn is our test oracle, not a dependency):

- Real spherical harmonics with normalization="component": sum_m Y_lm(r̂)^2 = 2l + 1.
  Rows of a degree-l block are m = -l..l; the l = 1 rows are (x, y, z) times sqrt(3).
- The polar axis is y. Y_l^m depends on the azimuth through (z + i x)^|m|:
  cos-type (real part) for m > 0, sin-type (imaginary part) for m < 0, and Y_l^0 only
  depends on y. This is why `pole_rotation` maps vectors onto +y.
- Wigner-D: Y_l(R r) = D_l(R) Y_l(r).
- Clebsch–Gordan: C[m1, m2, m3] couples l1 ⊗ l2 -> l3, Frobenius norm 1, e3nn's sign.

Everything here is exact (polynomials and linear algebra in float64), differentiable where
it says so, and batched over leading dimensions.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch

__all__ = [
    "spherical_harmonics",
    "spherical_harmonics_up_to",
    "solid_harmonics_tensor",
    "wigner_D",
    "clebsch_gordan",
    "pole_rotation",
    "pole_alignment",
]


# --------------------------------------------------------------------------------------
# Spherical harmonics
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _solid_harmonic_terms(l: int, m: int) -> tuple[tuple[int, int, float], ...]:
    """Monomials (a, b, c) with r^(l-m) d^m P_l/dt^m (t = y/r) = sum c · y^a · (r^2)^b, m >= 0,
    already multiplied by the component normalisation sqrt((2 - δ_m0)(2l+1)(l-m)!/(l+m)!)."""
    # Legendre: P_l(t) = 2^-l sum_j (-1)^j C(l, j) C(2l - 2j, l) t^(l - 2j)
    norm = math.sqrt((2 - (m == 0)) * (2 * l + 1) * math.factorial(l - m) / math.factorial(l + m))
    terms = []
    for j in range(l // 2 + 1):
        k = l - 2 * j  # power of t in P_l
        if k < m:
            continue
        coeff = Fraction((-1) ** j * math.comb(l, j) * math.comb(2 * l - 2 * j, l), 2**l)
        coeff *= Fraction(math.factorial(k), math.factorial(k - m))  # d^m/dt^m t^k
        # r^(l-m) t^(k-m) = y^(k-m) r^(l-k), and l - k = 2j is even
        terms.append((k - m, j, float(coeff) * norm))
    return tuple(terms)


def _solid_harmonics(l: int, xyz: torch.Tensor) -> torch.Tensor:
    """|r|^l Y_l(r̂) as a polynomial in x, y, z: [..., 3] -> [..., 2l+1]."""
    x, y, z = xyz.unbind(-1)
    r2 = x * x + y * y + z * z
    # Powers built by multiplication, not torch.pow, so every derivative is finite at 0.
    one = torch.ones_like(x)
    y_pow, r2_pow = [one], [one]
    cos_part, sin_part = [one], [torch.zeros_like(x)]  # (z + i x)^k = cos_part[k] + i sin_part[k]
    for _ in range(l):
        y_pow.append(y_pow[-1] * y)
        r2_pow.append(r2_pow[-1] * r2)
        c, s = cos_part[-1], sin_part[-1]
        cos_part.append(z * c - x * s)
        sin_part.append(z * s + x * c)
    rows = []
    for m in range(-l, l + 1):
        k = abs(m)
        polar = sum(c * y_pow[a] * r2_pow[b] for a, b, c in _solid_harmonic_terms(l, k))
        rows.append(polar * (cos_part[k] if m >= 0 else sin_part[k]))
    return torch.stack(rows, dim=-1)


def spherical_harmonics(l: int, vectors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Real spherical harmonics of degree l, e3nn "component" convention.

    vectors: [..., 3]. Returns [..., 2l+1]. With normalize=True, Y_l(r̂) (the zero vector gives
    Y_0 = 1 and zeros for l > 0, like e3nn); with normalize=False, the solid harmonic
    |r|^l Y_l(r̂), a homogeneous polynomial of degree l, smooth everywhere.
    """
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return _solid_harmonics(l, vectors)


def spherical_harmonics_up_to(l_max: int, vectors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Degrees 0..l_max concatenated: [..., 3] -> [..., (l_max+1)^2], degree-major rows."""
    return torch.cat([spherical_harmonics(l, vectors, normalize) for l in range(l_max + 1)], dim=-1)


@functools.lru_cache(maxsize=None)
def _solid_harmonics_tensor_f64(l: int) -> torch.Tensor:
    f = functools.partial(_solid_harmonics, l)
    for _ in range(l):
        f = torch.func.jacfwd(f)
    return f(torch.zeros(3, dtype=torch.float64)) / math.factorial(l)


def solid_harmonics_tensor(l: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The symmetric tensor A_l [2l+1, 3, ..., 3] (l spatial indices) with
    |r|^l Y_l(r̂) = A_l contracted with r l times; its gradient is l · A_l · r^(l-1)."""
    return _solid_harmonics_tensor_f64(l).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------
# Wigner-D matrices
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _wigner_samples(l: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fibonacci-sphere points P [K, 3] (K = 2(2l+1), well conditioned) and pinv(Y_l(P)^T) [K, 2l+1]."""
    k = 2 * (2 * l + 1)
    i = torch.arange(k, dtype=torch.float64) + 0.5
    y = 1 - 2 * i / k
    rho = torch.sqrt(1 - y * y)
    phi = math.pi * (3 - math.sqrt(5)) * i
    points = torch.stack([rho * torch.sin(phi), y, rho * torch.cos(phi)], dim=-1)
    pinv = torch.linalg.pinv(_solid_harmonics(l, points).T)
    return points.to(dtype=dtype, device=device), pinv.to(dtype=dtype, device=device)


def wigner_D(l: int, rotation: torch.Tensor) -> torch.Tensor:
    """Wigner-D matrix of degree l: rotation [..., 3, 3] -> [..., 2l+1, 2l+1], Y_l(R r) = D Y_l(r).

    Since Y_l(R p) is linear in Y_l(p), D is read off exactly from the harmonics of a fixed set of
    points p_k before and after rotation (least squares on a consistent, well conditioned system).
    D is a polynomial of degree l in the entries of R; computed in the dtype of `rotation`.
    """
    if l == 0:
        return torch.ones(*rotation.shape[:-2], 1, 1, dtype=rotation.dtype, device=rotation.device)
    if l == 1:
        return rotation.clone()  # Y_1(r) = sqrt(3) r
    points, pinv = _wigner_samples(l, rotation.dtype, rotation.device)
    rotated = _solid_harmonics(l, torch.einsum("...ij,kj->...ki", rotation, points))  # [..., K, 2l+1]
    return torch.einsum("...ki,kj->...ij", rotated, pinv)


# --------------------------------------------------------------------------------------
# Clebsch–Gordan coefficients
# --------------------------------------------------------------------------------------


def _complex_basis_row(l: int, m: int) -> torch.Tensor:
    """Row m of e3nn's real -> complex change of basis for degree l (complex128 [2l+1]):
    the complex harmonic of order m as a combination of the real ones (with e3nn's (-i)^l)."""
    q = torch.zeros(2 * l + 1, dtype=torch.complex128)
    k = abs(m)
    if m == 0:
        q[l] = 1
    elif m < 0:
        q[l + k], q[l - k] = 1 / math.sqrt(2), -1j / math.sqrt(2)
    else:
        q[l + k], q[l - k] = (-1) ** k / math.sqrt(2), 1j * (-1) ** k / math.sqrt(2)
    return (-1j) ** l * q


@functools.lru_cache(maxsize=None)
def _clebsch_gordan_f64(l1: int, l2: int, l3: int) -> torch.Tensor:
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        raise ValueError(f"no coupling {l1} x {l2} -> {l3}")
    # C is the invariant vector of D1 ⊗ D2 ⊗ D3 (D3 is real orthogonal, so coupling to l3 is the
    # same as an invariant of three factors): the null vector of sum_R (I - G(R))^T (I - G(R)) for
    # two generic rotations (they generate a dense subgroup). Rows ±m carry the azimuthal
    # frequency |m| about the pole, so only entries with |m3| = |m1| ± |m2| can be non-zero:
    # solving on that support keeps the eigenproblem small.
    m1, m2, m3 = (torch.arange(-l, l + 1).abs() for l in (l1, l2, l3))
    m1, m2, m3 = m1[:, None, None], m2[None, :, None], m3[None, None, :]
    support = ((m3 == m1 + m2) | (m3 == (m1 - m2).abs())).flatten()
    gram = 0
    for axis, angle in (((1.0, 2.0, 3.0), 1.0), ((-2.0, 1.0, 0.5), 2.3)):
        w = torch.tensor(axis, dtype=torch.float64)
        w = angle * w / w.norm()
        skew = torch.zeros(3, 3, dtype=torch.float64)
        skew[0, 1], skew[0, 2], skew[1, 2] = -w[2], w[1], -w[0]
        rotation = torch.linalg.matrix_exp(skew - skew.T)
        d1, d2, d3 = (wigner_D(l, rotation) for l in (l1, l2, l3))
        residual = torch.kron(torch.kron(d1, d2), d3)[:, support] - torch.eye(len(support), dtype=torch.float64)[:, support]
        gram = gram + residual.T @ residual
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    assert eigenvalues[0] < 1e-10 and (len(eigenvalues) == 1 or eigenvalues[1] > 1e-3), "null space is not 1-D"
    cg = torch.zeros(len(support), dtype=torch.float64)
    cg[support] = eigenvectors[:, 0]
    cg = cg.reshape(2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)

    # e3nn's sign: in its complex basis the Condon–Shortley coefficient
    # <l1 l1; l2 (l3 - l1) | l3 l3> is positive.
    q1 = _complex_basis_row(l1, l1).conj()
    q2 = _complex_basis_row(l2, l3 - l1).conj()
    q3 = _complex_basis_row(l3, l3)
    anchor = torch.einsum("i,j,k,ijk->", q1, q2, q3, cg.to(torch.complex128)).real
    return cg if anchor > 0 else -cg


@functools.lru_cache(maxsize=None)
def clebsch_gordan(l1: int, l2: int, l3: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Real Clebsch–Gordan tensor [2l1+1, 2l2+1, 2l3+1], equal to e3nn.o3.wigner_3j(l1, l2, l3).

    Cached per (l1, l2, l3, dtype, device): the returned tensor is shared, do not modify it.
    """
    return _clebsch_gordan_f64(l1, l2, l3).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------
# Frames that put a vector on the pole
# --------------------------------------------------------------------------------------


def pole_rotation(vectors: torch.Tensor) -> torch.Tensor:
    """Rotations R [..., 3, 3] (float64, no autograd) with R r = |r| e_y, the pole.

    With r̂ = (sin β sin α, cos β, sin β cos α): R = Rx(β)^T Ry(α)^T, whose middle row is r̂.
    The roll is fixed by this choice. Degenerate cases are fixed by convention:
    on the y axis α = 0 (R = identity at +y, a half-turn about x at -y); the zero vector gets
    the identity. The frame jumps where α does, but products that are equivariant do not.
    """
    v = vectors.detach().to(torch.float64)
    length = v.norm(dim=-1, keepdim=True)
    pole = torch.zeros_like(v)
    pole[..., 1] = 1.0
    u = torch.where(length > 0, v / length.clamp_min(torch.finfo(v.dtype).tiny), pole)
    ux, uy, uz = u.unbind(-1)
    sin_beta = torch.hypot(ux, uz)
    on_axis = sin_beta == 0
    safe = torch.where(on_axis, torch.ones_like(sin_beta), sin_beta)
    sin_alpha = torch.where(on_axis, torch.zeros_like(ux), ux / safe)
    cos_alpha = torch.where(on_axis, torch.ones_like(uz), uz / safe)
    zero = torch.zeros_like(ux)
    rows = [
        torch.stack([cos_alpha, zero, -sin_alpha], dim=-1),
        u,
        torch.stack([uy * sin_alpha, -sin_beta, uy * cos_alpha], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def pole_alignment(vectors: torch.Tensor, l_max: int) -> list[torch.Tensor]:
    """Wigner-D of `pole_rotation(vectors)` for l = 0..l_max: list of [..., 2l+1, 2l+1], float64.

    D_l maps a degree-l feature into the frame where r lies on +y; D_l^T maps it back.
    Built without autograd: never differentiate through the frame (singular at the poles).
    """
    rotation = pole_rotation(vectors)
    return [wigner_D(l, rotation) for l in range(l_max + 1)]
