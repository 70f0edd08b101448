"""The active-learning round: carving from MD frames, committee disagreement, selection, the plan it writes."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch

from e2former_calc import active_learning, datagen
from e2former_calc.checkpoint import save_model
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
from e2former_calc.water import build_water_box

TINY = dict(channels=8, num_blocks=1, num_heads=2, head_dim=4, cutoff=4.0, num_radial=6, edge_hidden=8,
            avg_num_neighbors=4.0)


def tiny_model(seed: int) -> E2FormerV2:
    torch.manual_seed(seed)
    return E2FormerV2(E2FormerConfig.from_dict({**E2FormerConfig.water_small().to_dict(), **TINY})).double()


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """A 3-frame 'MD trajectory' of a 27-water box; frame 2 has one stretched O–H (a dissociating water)."""
    frames = []
    for step in range(3):
        box = build_water_box(27, seed=step)
        box.info["step"] = 100 * step
        frames.append(box)
    frames[2].positions[1] += 0.6 * (frames[2].positions[1] - frames[2].positions[0])
    path = tmp_path_factory.mktemp("md") / "trajectory.extxyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def test_candidates_are_intact_clusters_of_the_asked_sizes(trajectory):
    snapshots = active_learning.trajectory_snapshots(trajectory, 350.0, seed=7, skip=0)
    assert [s.info["snapshot"] for s in snapshots] == [0, 1, 2] and snapshots[2].info["md_step"] == 200
    candidates = active_learning.carve_candidates(snapshots, 27, 3, 5, np.random.default_rng(0))
    sizes = {c.info["n_waters"] for c in candidates}
    assert sizes <= {3, 4, 5} and len(sizes) > 1
    assert all(active_learning.intact(c) for c in candidates)
    # Frame 2's broken water (molecule 0) is in no candidate carved from frame 2 around it; the rest are kept.
    from_frame_2 = [c for c in candidates if c.info["md_step"] == 200]
    assert 0 < len(from_frame_2) < 27 and len([c for c in candidates if c.info["md_step"] == 0]) == 27


def test_disagreement_is_zero_for_identical_members_and_positive_otherwise(trajectory):
    snapshots = active_learning.trajectory_snapshots(trajectory, 300.0, seed=1, skip=0)[:1]
    candidates = active_learning.carve_candidates(snapshots, 4, 2, 3, np.random.default_rng(1))
    same = active_learning.committee_disagreement([(tiny_model(0), "conservative")] * 2, candidates)
    np.testing.assert_allclose(same, 0.0, atol=1e-12)
    models = [(tiny_model(0), "conservative"), (tiny_model(1), "conservative"), (tiny_model(2), "direct")]
    scores = active_learning.committee_disagreement(models, candidates)
    assert scores.shape == (len(candidates),) and (scores > 0).all()
    # By hand for the first candidate: max over atoms of sqrt(sum_xyz var over members).
    forces = np.stack([active_learning.predicted_forces(m, candidates[:1], mode)[0] for m, mode in models])
    assert scores[0] == pytest.approx(np.sqrt(forces.var(axis=0).sum(-1)).max(), rel=1e-12)


def test_selection_takes_the_highest_scores_with_a_per_frame_cap(trajectory):
    snapshots = active_learning.trajectory_snapshots(trajectory, 300.0, seed=1, skip=0)[:2]
    candidates = active_learning.carve_candidates(snapshots, 5, 2, 2, np.random.default_rng(2))
    scores = np.arange(len(candidates), dtype=float)  # later candidates (frame 1) score higher
    chosen = active_learning.select_disputed(candidates, scores, n_select=3, per_frame=2)
    assert [c.info["committee_disagreement"] for c in chosen] == [9.0, 8.0, 4.0]  # third from frame 0


def test_select_command_writes_a_labelable_plan(trajectory, tmp_path):
    paths = []
    for seed in (0, 1):
        weights, _ = save_model(tiny_model(seed), tmp_path / f"m{seed}", {"metrics": {"force_mode": "direct"}})
        paths.append(str(weights))
    out = tmp_path / "al.extxyz"
    assert active_learning.main(["select", str(trajectory), "--temperatures", "330", "--committee", *paths,
                                 "--out", str(out), "--n-select", "4", "--skip", "1", "--min-waters", "2",
                                 "--max-waters", "3", "--round", "2"]) == 0
    plan = ase.io.read(out, index=":")
    assert len(plan) == 4
    assert [f.info["plan_index"] for f in plan] == [200000, 200001, 200002, 200003]
    assert all(f.info["source"] == "active-learning" and f.info["al_round"] == 2 for f in plan)
    assert all(f.info["config_id"] == datagen.config_id(f) and f.info["temperature_K"] == 330 for f in plan)
    assert all(f.info["md_step"] in (100, 200) for f in plan)  # --skip 1 dropped frame 0
    # datagen's selection (what `label` runs on) accepts the plan as it is.
    assert len(datagen.select_frames(plan, "small-first")) == 4


def test_defects_command_centres_clusters_on_the_broken_waters(trajectory, tmp_path):
    frames = ase.io.read(trajectory, index=":")
    assert [active_learning.broken_waters(frame) for frame in frames] == [[], [], [0]]
    out = tmp_path / "defects.extxyz"
    assert active_learning.main(["defects", str(trajectory), "--temperature", "300", "--first-step", "100",
                                 "--sizes", "3", "5", "--out", str(out), "--round", "3"]) == 0
    plan = ase.io.read(out, index=":")
    assert [len(f) // 3 for f in plan] == [3, 5]
    assert all(f.info["source"] == "md-failure" and f.info["md_step"] == 200 and f.info["centre"] == 0 for f in plan)
    assert [f.info["plan_index"] for f in plan] == [350000, 350001]  # the committee's round 3 starts at 300000
    stretched = np.linalg.norm(plan[0].positions[1] - plan[0].positions[0])  # the centre comes first, its O at the origin
    assert stretched > active_learning.MAX_OH_BOND
    assert len(datagen.select_frames(plan, "small-first")) == 2
    # A window without a broken water writes nothing and says so.
    assert active_learning.main(["defects", str(trajectory), "--temperature", "300", "--last-step", "100",
                                 "--out", str(tmp_path / "none.extxyz")]) == 1


def test_molecular_integrity_finds_stretched_bonds_and_close_contacts(trajectory):
    frames = ase.io.read(trajectory, index=":")
    intact = active_learning.molecular_integrity(frames[:2])
    assert intact["frames"] == 2 and intact["frames_with_broken_water"] == 0
    assert intact["longest_OH_bond_angstrom"] == pytest.approx(0.9572, abs=1e-6)  # the builder's rigid waters
    assert 1.0 < intact["shortest_intermolecular_OH_angstrom"] < 3.0
    assert active_learning.molecular_integrity(frames)["frames_with_broken_water"] == 1
    # A hydrogen of water 1 moved to 0.8 Å from water 0's oxygen through the periodic boundary.
    close = frames[0].copy()
    close.positions[4] = close.positions[0] - [0.8, 0.0, 0.0] + [close.cell[0, 0], 0.0, 0.0]
    found = active_learning.molecular_integrity([close])
    assert found["shortest_intermolecular_OH_angstrom"] == pytest.approx(0.8, abs=1e-9)
    assert found["frames_with_broken_water"] == 1  # that hydrogen left its own oxygen
    assert intact["frames_with_HH_contact"] == 0 and intact["shortest_intermolecular_HH_angstrom"] > active_learning.HH_CONTACT
    # A hydrogen of water 1 placed 1.2 Å from a hydrogen of water 0, through the periodic boundary: one contact.
    contact = frames[0].copy()
    contact.positions[4] = contact.positions[1] + [1.2, 0.0, 0.0] - [contact.cell[0, 0], 0.0, 0.0]
    found = active_learning.molecular_integrity([contact])
    assert found["shortest_intermolecular_HH_angstrom"] == pytest.approx(1.2, abs=1e-9)
    assert found["frames_with_HH_contact"] == 1 and found["HH_contacts_per_frame"] >= 1
