"""so3.py against e3nn 0.6 (the oracle) and against the identities that define each object."""

import pytest
import torch
from e3nn import o3

from e2former_calc.models import so3

L_MAX = 4
DEGREES = range(L_MAX + 1)
TRIPLES = [(l1, l2, l3) for l1 in DEGREES for l2 in DEGREES for l3 in range(abs(l1 - l2), min(l1 + l2, L_MAX) + 1)]


pytestmark = pytest.mark.usefixtures("float64_single_thread")


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def special_vectors(dtype=torch.float64):
    """Random vectors plus the awkward ones: both poles, other axes, the origin, near the pole."""
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor(
        [[0, 1, 0], [0, -2, 0], [1, 0, 0], [0, 0, -1], [0, 0, 0], [1e-9, 1, 0], [0.3, -1e-12, 0]],
        dtype=torch.float64,
    )
    return torch.cat([special, 3 * torch.randn(9, 3, generator=generator, dtype=torch.float64)]).to(dtype)


@pytest.mark.parametrize("l", DEGREES)
@pytest.mark.parametrize("normalize", [True, False])
def test_spherical_harmonics_equal_e3nn(l, normalize):
    vectors = special_vectors()
    ours = so3.spherical_harmonics(l, vectors, normalize=normalize)
    theirs = o3.spherical_harmonics(l, vectors, normalize=normalize, normalization="component")
    assert ours.shape == (len(vectors), 2 * l + 1)
    assert relative_error(ours, theirs) < 1e-12


def test_spherical_harmonics_up_to_and_float32():
    vectors = special_vectors()
    ours = so3.spherical_harmonics_up_to(L_MAX, vectors.float())
    theirs = o3.spherical_harmonics(list(DEGREES), vectors, normalize=True, normalization="component")
    assert ours.dtype == torch.float32 and ours.shape == (len(vectors), (L_MAX + 1) ** 2)
    assert relative_error(ours.double(), theirs) < 1e-5


@pytest.mark.parametrize("l", [1, 2, 3])
def test_solid_harmonics_are_smooth_polynomials(l):
    """Gradients and second derivatives of |r|^l Y_l are finite and correct, also at r = 0."""
    vectors = special_vectors()[:8].requires_grad_()
    f = lambda v: so3.spherical_harmonics(l, v, normalize=False)  # noqa: E731
    assert torch.autograd.gradcheck(f, (vectors,))
    assert torch.autograd.gradgradcheck(f, (vectors,))


@pytest.mark.parametrize("l", [1, 2, 3])
def test_solid_harmonics_tensor_reproduces_harmonics(l):
    vectors = special_vectors()
    tensor = so3.solid_harmonics_tensor(l)
    assert tensor.shape == (2 * l + 1,) + (3,) * l
    assert torch.allclose(tensor, tensor.transpose(-1, 1))  # symmetric in the spatial indices
    contracted = tensor.expand(len(vectors), *tensor.shape)
    for _ in range(l):
        contracted = torch.einsum("n...b,nb->n...", contracted, vectors)
    assert relative_error(contracted, so3.spherical_harmonics(l, vectors, normalize=False)) < 1e-12


def test_clebsch_gordan_equal_e3nn_wigner_3j():
    for l1, l2, l3 in TRIPLES:
        ours = so3.clebsch_gordan(l1, l2, l3)
        assert ours.shape == (2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)
        assert relative_error(ours, o3.wigner_3j(l1, l2, l3)) < 1e-12, (l1, l2, l3)
    assert so3.clebsch_gordan(1, 2, 3, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError):
        so3.clebsch_gordan(1, 1, 3)


@pytest.mark.parametrize("l", DEGREES)
def test_wigner_D_equals_e3nn_and_is_an_orthogonal_representation(l):
    r1, r2 = o3.rand_matrix(2, 5, dtype=torch.float64)
    d1, d2 = so3.wigner_D(l, r1), so3.wigner_D(l, r2)
    assert d1.shape == (5, 2 * l + 1, 2 * l + 1)
    assert relative_error(d1, o3.Irrep(l, 1).D_from_matrix(r1)) < 1e-12
    assert relative_error(so3.wigner_D(l, r1 @ r2), d1 @ d2) < 1e-12
    eye = torch.eye(2 * l + 1, dtype=torch.float64)
    assert (d1 @ d1.transpose(-1, -2) - eye).abs().max() < 1e-12
    vectors = torch.randn(5, 3, dtype=torch.float64)
    rotated = so3.spherical_harmonics(l, torch.einsum("nij,nj->ni", r1, vectors))
    assert relative_error(rotated, torch.einsum("nij,nj->ni", d1, so3.spherical_harmonics(l, vectors))) < 1e-12


def test_pole_rotation_puts_vectors_on_the_pole():
    vectors = special_vectors()
    rotation = so3.pole_rotation(vectors)
    assert rotation.dtype == torch.float64 and not rotation.requires_grad
    eye = torch.eye(3, dtype=torch.float64)
    assert (rotation @ rotation.transpose(-1, -2) - eye).abs().max() < 1e-14
    assert (torch.linalg.det(rotation) - 1).abs().max() < 1e-14
    on_pole = torch.einsum("nij,nj->ni", rotation, vectors)
    expected = torch.zeros_like(vectors)
    expected[:, 1] = vectors.norm(dim=-1)
    assert (on_pole - expected).abs().max() < 1e-14
    assert torch.equal(rotation[4], eye)  # the origin gets the identity frame
    assert torch.equal(rotation[0], eye)  # so does a vector already on +y


def test_pole_alignment_sparsifies_the_harmonics():
    """In the aligned frame only the m = 0 row of every Y_l survives (paper Lemma 4.1)."""
    vectors = special_vectors()
    wigner = so3.pole_alignment(vectors, L_MAX)
    for l, d in enumerate(wigner):
        aligned = torch.einsum("nij,nj->ni", d, so3.spherical_harmonics(l, vectors, normalize=False))
        expected = torch.zeros_like(aligned)
        expected[:, l] = (2 * l + 1) ** 0.5 * vectors.norm(dim=-1) ** l
        assert (aligned - expected).abs().max() < 1e-12 * max(1.0, expected.abs().max().item())
