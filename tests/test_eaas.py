"""EAAS tensor product: equal to the dense CG contraction and to e3nn, equivariant, and with
exact first and second derivatives, also for vectors on the poles, on the axes and at 0."""

import pytest
import torch
from e3nn import o3

from e2former_calc.models import so3
from e2former_calc.models.eaas import (
    EAASTensorProduct,
    dense_operator,
    dense_tensor_product,
    eaas_operator,
    eaas_tensor_product,
    pole_reindexing,
    tensor_product_paths,
)

# (l_in, l_filter, l_out)
CASES = [(l, l_filter, l) for l_filter in (1, 2) for l in (1, 2, 3)] + [(3, 1, 2), (2, 2, 3)]


pytestmark = pytest.mark.usefixtures("float64_single_thread")


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def special_vectors(num_random=9, seed=0):
    """Both poles, other axes, the origin, almost the pole, then random vectors (Å)."""
    generator = torch.Generator().manual_seed(seed)
    special = torch.tensor(
        [[0, 1.5, 0], [0, -2, 0], [1, 0, 0], [0, 0, -1], [0, 0, 0], [1e-9, 1, 0], [0.3, -1e-12, 0]],
        dtype=torch.float64,
    )
    return torch.cat([special, 2 * torch.randn(num_random, 3, generator=generator, dtype=torch.float64)])


def random_features(n, l_in, channels, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, (l_in + 1) ** 2, channels, generator=generator, dtype=torch.float64)


def e3nn_tensor_product(x, vectors, l_in, l_filter, l_out):
    """The same product with e3nn.o3.TensorProduct ('uvu', no weights, no normalisation)."""
    channels = x.shape[-1]
    parity = lambda l: 1 if l % 2 == 0 else -1  # noqa: E731  solid harmonics have parity (-1)^l
    paths = tensor_product_paths(l_in, l_filter, l_out)
    tp = o3.TensorProduct(
        o3.Irreps([(channels, (l, parity(l))) for l in range(l_in + 1)]),
        o3.Irreps([(1, (l_filter, parity(l_filter)))]),
        o3.Irreps([(channels, (p.l3, parity(p.l1 + l_filter))) for p in paths]),
        [(p.l1, 0, k, "uvu", False) for k, p in enumerate(paths)],
        irrep_normalization="none",
        path_normalization="none",
    )
    # ours: [N, rows, C] per degree block; e3nn: [N, sum_l C (2l+1)] with channel-major blocks
    flat = torch.cat([x[:, l * l : (l + 1) ** 2].transpose(1, 2).flatten(1) for l in range(l_in + 1)], dim=1)
    out = tp(flat, o3.spherical_harmonics(l_filter, vectors, normalize=False, normalization="component"))
    blocks, start = [], 0
    for p in paths:
        width = channels * (2 * p.l3 + 1)
        blocks.append(out[:, start : start + width].view(-1, channels, 2 * p.l3 + 1).transpose(1, 2))
        start += width
    return torch.cat(blocks, dim=1)


def test_paths_cover_the_output_rows_in_order():
    paths = tensor_product_paths(2, 1, 2)
    assert [(p.l1, p.l3) for p in paths] == [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert paths[0].rows.start == 0
    assert all(a.rows.stop == b.rows.start for a, b in zip(paths, paths[1:]))
    assert all(p.rows.stop - p.rows.start == 2 * p.l3 + 1 for p in paths)
    module = EAASTensorProduct(2, 1, 2)
    assert module.path_rows() == [p.rows for p in paths] and module.num_rows == 20


@pytest.mark.parametrize("l_in, l_filter, l_out", CASES)
def test_pole_operator_is_a_parity_reindexing_of_the_cg_tensor(l_in, l_filter, l_out):
    """One input row per output row; m -> m for even l1 + lf + l3, m -> -m for odd (App. B),
    and the sparse table reproduces the full CG contraction at the pole."""
    sources, coefficients = pole_reindexing(l_in, l_filter, l_out)
    pole_filter = so3.spherical_harmonics(l_filter, torch.tensor([0.0, 1.0, 0.0]))
    for path in tensor_product_paths(l_in, l_filter, l_out):
        full = torch.einsum("ifk,f->ki", so3.clebsch_gordan(path.l1, l_filter, path.l3), pole_filter)
        sparse = torch.zeros_like(full)
        for m3, (row, coeff) in enumerate(zip(sources[path.rows].tolist(), coefficients[path.rows])):
            if coeff == 0:
                continue
            assert path.l1**2 <= row < (path.l1 + 1) ** 2
            sparse[m3, row - path.l1**2] = coeff
            m_out, m_in = m3 - path.l3, row - path.l1**2 - path.l1
            assert m_in == (m_out if (path.l1 + l_filter + path.l3) % 2 == 0 else -m_out)
        assert torch.allclose(sparse, full, atol=1e-14, rtol=0)
        if (path.l1 + l_filter + path.l3) % 2 == 1:
            assert coefficients[path.rows][path.l3] == 0  # m3 = 0 vanishes for odd parity


@pytest.mark.parametrize("l_in, l_filter, l_out", CASES)
def test_eaas_operator_equals_dense_operator(l_in, l_filter, l_out):
    """Rotate in, re-index, rotate back = the CG contraction with ℛ(r) (Proposition 4.3)."""
    vectors = special_vectors()
    eaas, dense = eaas_operator(vectors, l_in, l_filter, l_out), dense_operator(vectors, l_in, l_filter, l_out)
    assert eaas.shape == dense.shape == (len(vectors), tensor_product_paths(l_in, l_filter, l_out)[-1].rows.stop, (l_in + 1) ** 2)
    assert relative_error(eaas, dense) < 1e-12


@pytest.mark.parametrize("l_in, l_filter, l_out", CASES)
def test_eaas_equals_dense_product_and_e3nn(l_in, l_filter, l_out):
    vectors = special_vectors()
    x = random_features(len(vectors), l_in, channels=4)
    eaas = eaas_tensor_product(x, vectors, l_in, l_filter, l_out)
    dense = dense_tensor_product(x, vectors, l_in, l_filter, l_out)
    reference = e3nn_tensor_product(x, vectors, l_in, l_filter, l_out)
    assert eaas.shape == (len(vectors), tensor_product_paths(l_in, l_filter, l_out)[-1].rows.stop, 4)
    assert relative_error(dense, reference) < 1e-12
    assert relative_error(eaas, reference) < 1e-10
    assert eaas[4].abs().max() == 0  # the origin: ℛ^lf(0) = 0


@pytest.mark.parametrize("l_filter", [1, 2])
def test_eaas_is_equivariant(l_filter):
    l_in = l_out = 2
    vectors = special_vectors()
    x = random_features(len(vectors), l_in, channels=3)
    rotation = o3.rand_matrix(dtype=torch.float64)
    rotate = lambda features, degrees: torch.cat(  # noqa: E731
        [so3.wigner_D(l, rotation) @ features[:, start : start + 2 * l + 1] for l, start in degrees], dim=1
    )
    paths = tensor_product_paths(l_in, l_filter, l_out)
    x_rotated = rotate(x, [(l, l * l) for l in range(l_in + 1)])
    out_rotated = eaas_tensor_product(x_rotated, vectors @ rotation.T, l_in, l_filter, l_out)
    expected = rotate(eaas_tensor_product(x, vectors, l_in, l_filter, l_out), [(p.l3, p.rows.start) for p in paths])
    assert relative_error(out_rotated, expected) < 1e-10


def test_float32_matches_float64():
    vectors, x = special_vectors(), random_features(16, 2, channels=8)
    single = eaas_tensor_product(x.float(), vectors.float(), 2, 1, 2)
    assert single.dtype == torch.float32
    assert relative_error(single.double(), dense_tensor_product(x, vectors, 2, 1, 2)) < 1e-5


@pytest.mark.parametrize("l_filter", [1, 2])
def test_gradients_are_exact_at_poles_axes_and_origin(l_filter):
    """gradcheck / gradgradcheck of EAAS against finite differences, and equality of first and
    second derivatives with the dense product (autograd through plain polynomials)."""
    l_in = l_out = 2
    vectors = special_vectors(num_random=3).requires_grad_()
    x = random_features(len(vectors), l_in, channels=2).requires_grad_()
    eaas = lambda a, b: eaas_tensor_product(a, b, l_in, l_filter, l_out)  # noqa: E731
    dense = lambda a, b: dense_tensor_product(a, b, l_in, l_filter, l_out)  # noqa: E731
    assert torch.autograd.gradcheck(eaas, (x, vectors))
    assert torch.autograd.gradgradcheck(eaas, (x, vectors))

    weights = torch.randn_like(dense(x, vectors))

    def derivatives(product):
        # first derivatives, then the derivative of a scalar function of them (as in force training)
        gx, gr = torch.autograd.grad((weights * product(x, vectors)).sum(), (x, vectors), create_graph=True)
        second = torch.autograd.grad((gr**2).sum() + (gx**3).sum(), (x, vectors))
        return gx, gr, *second

    for ours, reference in zip(derivatives(eaas), derivatives(dense)):
        assert torch.isfinite(ours).all()
        assert relative_error(ours, reference) < 1e-10
