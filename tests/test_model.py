"""The network's symmetries, smoothness and derivatives (issue: E2Former-V2 network).

Tight checks run in float64 on small random-weight models; both value paths are covered.
"""

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2, ScatterSum
from e2former_calc.models.so3 import wigner_D
from e2former_calc.neighbors import build_graph
from e2former_calc.water import build_water_box

TINY = dict(species=(1, 6, 8), l_max=2, channels=8, num_blocks=2, num_heads=4, head_dim=4,
            cutoff=4.0, num_radial=6, edge_hidden=8, avg_num_neighbors=4.0)


def make_model(value_path="moments", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    model = E2FormerV2(E2FormerConfig(**{**TINY, "value_path": value_path, **overrides})).to(dtype)
    with torch.no_grad():  # non-trivial reference energies so that they are exercised
        model.reference_energy.copy_(torch.randn_like(model.reference_energy))
    return model


def random_rotation(seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def evaluate(model, atoms_list, **kwargs):
    dtype = next(model.parameters()).dtype
    return model(build_graph(atoms_list, model.config.cutoff, dtype=dtype), **kwargs)


def ethanol_water():
    atoms = molecule("CH3CH2OH")
    water = molecule("H2O")
    water.translate([2.5, 1.0, 0.5])
    return atoms + water


@pytest.mark.parametrize("value_path", ["moments", "eaas"])
def test_rotation_invariance_and_equivariance_float64(value_path):
    model = make_model(value_path)
    atoms = ethanol_water()
    rotation = random_rotation(1)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.numpy().T
    graph = build_graph([atoms], model.config.cutoff, dtype=torch.float64)
    graph_rotated = build_graph([rotated], model.config.cutoff, dtype=torch.float64)

    out, out_rotated = model(graph), model(graph_rotated)
    assert torch.allclose(out["energy"], out_rotated["energy"], rtol=1e-10, atol=0)
    forces_rotated = out["forces"] @ rotation.T
    assert (forces_rotated - out_rotated["forces"]).abs().max() < 1e-10 * out["forces"].abs().max()

    features, _ = model.node_features(graph)
    features_rotated, _ = model.node_features(graph_rotated)
    for l in range(1, model.config.l_max + 1):
        wigner = wigner_D(l, rotation)  # exact in float64 (e3nn's D_from_matrix is only ~1e-7)
        expected = torch.einsum("mk,nkc->nmc", wigner, features[:, l * l : (l + 1) ** 2])
        error = (expected - features_rotated[:, l * l : (l + 1) ** 2]).abs().max()
        assert error < 1e-10 * features[:, l * l : (l + 1) ** 2].abs().max()


def test_rotation_equivariance_float32():
    model = make_model(dtype=torch.float32)
    atoms = ethanol_water()
    rotation = random_rotation(2, torch.float32)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.double().numpy().T
    out, out_rotated = evaluate(model, [atoms]), evaluate(model, [rotated])
    assert abs(out["energy"] - out_rotated["energy"]) < 1e-5 * out["energy"].abs()
    error = (out["forces"] @ rotation.T - out_rotated["forces"]).norm(dim=1).max()
    assert error < 1e-5 * out["forces"].norm(dim=1).max()


def test_translation_far_from_origin_float32_moments():
    """Shift the graph's float32 positions by 1000 Å (build_graph would centre them away)."""
    model = make_model(dtype=torch.float32)
    graph64 = build_graph([ethanol_water()], model.config.cutoff, dtype=torch.float64)
    graph = graph64.to(dtype=torch.float32)
    energy = model(graph, compute_forces=False)["energy"]
    graph.positions = (graph64.positions + torch.tensor([1000.0, -1000.0, 1000.0], dtype=torch.float64)).float()
    energy_shifted = model(graph, compute_forces=False)["energy"]
    assert abs(energy - energy_shifted) < 1e-5 * energy.abs()


def test_float32_model_totals_energy_in_float64():
    """Per-atom energies near -1000 eV: a float32 total of 192 atoms would be off by up to ~0.01 eV."""
    model = make_model(dtype=torch.float32)
    with torch.no_grad():
        model.reference_energy.fill_(-1000.123)
    atoms = build_water_box(64, seed=0)
    out = evaluate(model, [atoms], compute_forces=False)
    model64 = make_model(dtype=torch.float64)
    with torch.no_grad():
        model64.reference_energy.copy_(model.reference_energy.double())
    exact = evaluate(model64, [atoms], compute_forces=False)["energy"]
    assert out["energy"].dtype == torch.float64
    assert abs(out["energy"] - exact).item() < 1e-3


def test_permutation_and_batching_match_single_evaluations():
    model = make_model()
    atoms_a, atoms_b = ethanol_water(), molecule("CH4")
    permutation = np.random.default_rng(0).permutation(len(atoms_a))
    out_a = evaluate(model, [atoms_a])
    out_permuted = evaluate(model, [atoms_a[permutation]])
    assert torch.allclose(out_a["energy"], out_permuted["energy"], rtol=1e-12)
    assert torch.allclose(out_a["forces"][permutation], out_permuted["forces"], atol=1e-12)

    out_b = evaluate(model, [atoms_b])
    batched = evaluate(model, [atoms_a, atoms_b])
    assert torch.allclose(batched["energy"], torch.cat([out_a["energy"], out_b["energy"]]), rtol=1e-12)
    assert torch.allclose(batched["forces"], torch.cat([out_a["forces"], out_b["forces"]]), atol=1e-12)


def test_value_paths_agree_float64():
    moments, eaas = make_model("moments"), make_model("eaas")
    eaas.load_state_dict(moments.state_dict())
    atoms = ethanol_water()
    out_moments, out_eaas = evaluate(moments, [atoms]), evaluate(eaas, [atoms])
    assert torch.allclose(out_moments["energy"], out_eaas["energy"], rtol=1e-10, atol=0)
    scale = out_moments["forces"].abs().max()
    assert (out_moments["forces"] - out_eaas["forces"]).abs().max() < 1e-10 * scale


def test_eaas_path_refuses_periodic_systems():
    model = make_model("eaas")
    with pytest.raises(ValueError, match="non-periodic"):
        evaluate(model, [build_water_box(8)])


def test_conservative_forces_match_finite_differences():
    model = make_model()
    atoms = ethanol_water()
    forces = evaluate(model, [atoms])["forces"].numpy()
    step = 1e-5
    rng = np.random.default_rng(0)
    for atom, axis in zip(rng.choice(len(atoms), 4, replace=False), rng.integers(0, 3, 4)):
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions[atom, axis] += sign * step
            energies.append(evaluate(model, [displaced], compute_forces=False)["energy"].item())
        finite_difference = -(energies[0] - energies[1]) / (2 * step)
        assert abs(finite_difference - forces[atom, axis]) < 1e-6 * np.abs(forces).max()


def test_energy_and_forces_continuous_across_cutoff():
    """A dimer scanned through the cutoff: no jump beyond float64 round-off."""
    model = make_model()
    cutoff = model.config.cutoff
    distances = cutoff + np.linspace(-1e-5, 1e-5, 21)
    energies, forces = [], []
    for distance in distances:
        dimer = Atoms("CO", positions=[[0, 0, 0], [distance, 0, 0]])
        out = evaluate(model, [dimer])
        energies.append(out["energy"].item())
        forces.append(out["forces"][0, 0].item())
    energies, forces = np.array(energies), np.array(forces)
    # Beyond the cutoff the atoms are isolated; approaching it, energy and force go there smoothly.
    assert np.abs(np.diff(energies)).max() < 1e-12
    assert np.abs(forces).max() < 1e-10


def test_direct_force_head_is_equivariant_and_stress_needs_conservative():
    model = make_model()
    atoms = ethanol_water()
    rotation = random_rotation(3)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.numpy().T
    forces = evaluate(model, [atoms], mode="direct")["forces"]
    forces_rotated = evaluate(model, [rotated], mode="direct")["forces"]
    assert (forces @ rotation.T - forces_rotated).abs().max() < 1e-10 * forces.abs().max()
    with pytest.raises(ValueError, match="conservative"):
        evaluate(model, [build_water_box(8)], mode="direct", compute_stress=True)


def zbl_pair_energy(z1, z2, r, cutoff):
    """The ZBL universal repulsion times the polynomial envelope, written out from the formula (eV)."""
    a = 0.8854 * 0.529177210903 / (z1**0.23 + z2**0.23)
    x = r / a
    phi = 0.18175 * np.exp(-3.1998 * x) + 0.50986 * np.exp(-0.94229 * x) + 0.28022 * np.exp(-0.4029 * x) \
        + 0.02817 * np.exp(-0.20162 * x)
    u = min(r / cutoff, 1.0)
    return 14.399645 * z1 * z2 / r * phi * (1 - 10 * u**3 + 15 * u**4 - 6 * u**5)


def test_zbl_repulsion_adds_the_screened_coulomb_pair_energy_below_the_covalent_radii():
    plain, repulsive = make_model(), make_model(zbl=True)
    for r in (0.3, 0.6, 0.9, 0.96, 0.97, 1.2):  # zero from r_c = 0.97 Å on
        dimer = Atoms("OH", positions=[[0, 0, 0], [r, 0, 0]])
        difference = evaluate(repulsive, [dimer])["energy"].item() - evaluate(plain, [dimer])["energy"].item()
        expected = zbl_pair_energy(8, 1, r, 0.66 + 0.31)  # Cordero covalent radii of O and H
        assert difference == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert zbl_pair_energy(8, 1, 0.6, 0.97) > 5  # ~200 kT at 300 K: a wall no thermal hydrogen climbs


@pytest.mark.parametrize("mode", ["conservative", "direct"])
def test_zbl_forces_are_minus_its_gradient_in_both_modes(mode):
    plain, repulsive = make_model(), make_model(zbl=True)
    atoms = ethanol_water()
    atoms.positions[-1] = atoms.positions[-3] + [0.55, 0.2, 0.1]  # a hydrogen squeezed onto the water's oxygen
    extra = (evaluate(repulsive, [atoms], mode=mode)["forces"] - evaluate(plain, [atoms], mode=mode)["forces"]).detach().numpy()
    assert np.abs(extra).max() > 1.0
    step = 1e-5
    for atom in (len(atoms) - 1, len(atoms) - 3):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.positions[atom, axis] += sign * step
                energies.append(evaluate(repulsive, [displaced], compute_forces=False)["energy"].item()
                                - evaluate(plain, [displaced], compute_forces=False)["energy"].item())
            assert extra[atom, axis] == pytest.approx(-(energies[0] - energies[1]) / (2 * step), rel=1e-6, abs=1e-6)


def test_unknown_element_is_named():
    model = make_model()
    with pytest.raises(ValueError, match=r"\[26\].*\[1, 6, 8\]"):
        evaluate(model, [Atoms("FeO", positions=[[0, 0, 0], [1.6, 0, 0]])])


def test_every_atom_depends_on_its_own_element():
    """Isolated atoms of different elements get different features (the reference code loses this)."""
    model = make_model()
    atoms = Atoms("HCO", positions=[[0, 0, 0], [20, 0, 0], [40, 0, 0]])
    energies = evaluate(model, [atoms], compute_forces=False)["energies"]
    reference = model.reference_energy
    assert len(set((energies - reference[[0, 1, 2]]).tolist())) == 3


@pytest.mark.parametrize("value_path", ["moments", "eaas"])
def test_inference_in_target_chunks_matches_one_pass(value_path):
    """Without autograd, large systems go through the network in chunks of target atoms."""
    model = make_model(value_path)
    atoms_list = [ethanol_water(), molecule("CH3CH2OH")]
    graph = build_graph(atoms_list, model.config.cutoff, dtype=torch.float64)
    with torch.no_grad():
        whole = model(graph, mode="direct")
        model.chunk_atoms = 4  # ragged: N is not a multiple of it
        assert len(graph.target_chunks(model.chunk_atoms)) > 3
        chunked = model(graph, mode="direct")
    for name in ("energy", "energies", "forces"):
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-12, atol=1e-12)
    assert not torch.equal(chunked["forces"], torch.zeros_like(chunked["forces"]))
    # The reference attention reads only differences of row_ptr; the kernel reads offsets into the chunk's edges.
    for chunk in graph.target_chunks(4):
        offsets = graph.chunk_row_ptr(chunk)
        assert offsets[0] == 0 and offsets[-1] == chunk.edges.stop - chunk.edges.start
        assert torch.equal(offsets.diff(), graph.row_ptr[chunk.atoms.start : chunk.atoms.stop + 1].diff())


def test_recomputed_force_pass_in_target_chunks_matches_plain_autograd():
    model = make_model()
    atoms = build_water_box(8, seed=1)
    graph = build_graph([atoms], model.config.cutoff, dtype=torch.float64)
    plain = model(graph, compute_stress=True)
    model.recompute_blocks, model.chunk_atoms = True, 5
    calls = []
    update = model.attentions[0].chunk_update
    model.attentions[0].chunk_update = lambda *args: calls.append(1) or update(*args)
    recomputed = model(graph, compute_stress=True)
    for name in ("energy", "forces", "stress"):
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-11, atol=1e-12)
    chunks = len(graph.target_chunks(5))
    assert chunks > 3 and len(calls) > chunks  # every chunk once forward, again in the force pass


def test_scatter_sum_equals_index_add_and_keeps_only_the_index():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(11, 3, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    index = torch.tensor([4, 0, 4, 2, 2, 2, 0, 5, 4, 1, 5])  # ragged; row 3 receives nothing
    expected = torch.zeros(6, 3, 2, dtype=torch.float64).index_add(0, index, source)
    torch.testing.assert_close(ScatterSum.apply(source, index, 6), expected, rtol=0, atol=0)
    assert torch.autograd.gradcheck(ScatterSum.apply, (source, index, 6))
    assert torch.autograd.gradgradcheck(ScatterSum.apply, (source, index, 6))

    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        ScatterSum.apply(source * 1.0, index, 6)  # the product keeps nothing of size source (scalar factor)
    assert torch.Size([11, 3, 2]) not in kept


def test_compiled_blocks_match_the_eager_model_and_call_the_attention_in_every_block(monkeypatch):
    """compile_blocks (torch.compile, dynamic shapes) computes the same energy, forces and stress at two
    system sizes, calling the attention op in every block, and a deep copy runs its own weights."""
    from e2former_calc.models import e2former

    model = make_model()
    compiled = make_model().compile_blocks()
    calls = []
    attention = e2former.neighbor_attention
    monkeypatch.setattr(e2former, "neighbor_attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    for waters in (8, 12):
        graph = build_graph([build_water_box(waters, seed=1)], model.config.cutoff, dtype=torch.float64)
        plain, fused = model(graph, compute_stress=True), compiled(graph, compute_stress=True)
        for name in ("energy", "forces", "stress"):
            torch.testing.assert_close(fused[name], plain[name], rtol=1e-10, atol=1e-11)
    assert len(calls) == 2 * 2 * model.config.num_blocks  # both models, both sizes, every block
    twins = copy.deepcopy(model), copy.deepcopy(compiled)
    for twin in twins:
        with torch.no_grad():
            twin.ffns[0].linear_out.weight.mul_(2.0)
    changed, fused_changed = (twin(graph)["forces"] for twin in twins)
    torch.testing.assert_close(fused_changed, changed, rtol=1e-10, atol=1e-11)
    assert (changed - plain["forces"]).abs().max() > 1e-6
