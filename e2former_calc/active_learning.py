"""Active learning: carve clusters from MD run with a trained model, keep those a committee disputes most.

    python -m e2former_calc.active_learning select TRAJ [TRAJ ...] --committee MODEL MODEL [MODEL ...]
        --out data/water/al_round1.extxyz [--round 1] [--n-select 40] [--candidates-per-frame 8]
        [--min-waters 4] [--max-waters 8] [--skip 5] [--seed 0]
    python -m e2former_calc.active_learning defects TRAJ --temperature 300 --first-step S [--last-step S]
        --out data/water/al_round3_defects.extxyz [--round 3] [--sizes 6 8]

The round, top to bottom:

    explore:  `e2former md --model M --water 64 ...` at a few temperatures (periodic liquid, the
              model's own dynamics, so it visits what the model believes, right or wrong)
    carve:    from every trajectory frame after --skip, clusters of the n waters nearest a random
              water (sampling.carve_cluster, n uniform in [min_waters, max_waters])
    score:    committee disagreement of each cluster = max over atoms of the standard deviation of
              the predicted force vector across the committee, sqrt(sum_xyz var_k F_k), in eV/Å
    select:   the n_select highest scores, at most --per-frame from one trajectory frame
    label:    `python -m e2former_calc.datagen label OUT --out-dir data/water` (the output is a plan)

A run that failed (a water dissociated, then the model's forces blew up: the model met what it was
never shown) gives a second kind of selection, `defects`: clusters of each size in --sizes centred
on every broken water (an intramolecular O–H longer than MAX_OH_BOND) of the frames at or after
--first-step (to --last-step), with `source` = "md-failure", so the labels teach the model what a proton transfer costs.

Committee members may differ in force mode: each predicts in the mode its checkpoint was selected in
(`metrics.force_mode` of the training export), else conservative. Each selected frame records
`source` = "active-learning", `al_round`, `committee_disagreement` (eV/Å), the trajectory it came
from (`trajectory`, `md_step`) and the usual provenance (`seed`, `snapshot`, `temperature_K`,
`n_waters`, `centre`), so frames of one trajectory frame share a split group in training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase import Atoms
from ase.geometry import get_distances
from tqdm import tqdm

from e2former_calc import sampling
from e2former_calc.checkpoint import load_model, model_description
from e2former_calc.datagen import config_id
from e2former_calc.neighbors import build_graph

MAX_OH_BOND = 1.3  # Å; a cluster with a longer intramolecular O–H (a dissociating water) is not carved
# Å; two hydrogens of different waters closer than this are a "contact": the labelled clusters hold none
# below 1.45 Å outside the frames around broken waters, and water's intermolecular g_HH is ~0 there
HH_CONTACT = 1.4
PLAN_INDEX_STRIDE = 100_000  # plan_index of round r starts at r * PLAN_INDEX_STRIDE (no clash with the base plan)


def trajectory_snapshots(path: Path, temperature: float, seed: int, skip: int) -> list[Atoms]:
    """The frames of one MD trajectory after `skip`, with the provenance keys carve_cluster copies."""
    snapshots = ase.io.read(path, index=f"{skip}:")
    for index, atoms in enumerate(snapshots):
        atoms.info.update(seed=seed, temperature_K=temperature, snapshot=index + skip,
                          trajectory=str(path), md_step=int(atoms.info.get("step", -1)))
    return snapshots


def oh_bonds(molecules: np.ndarray) -> np.ndarray:
    """[n, 2] O–H bond lengths (Å) of whole molecules [n, 3, 3] (O, H, H; `sampling.whole_molecules`)."""
    return np.linalg.norm(molecules[:, 1:] - molecules[:, :1], axis=-1)


def intact(cluster: Atoms) -> bool:
    """Every water of the (O, H, H)-ordered cluster has both O–H bonds shorter than MAX_OH_BOND."""
    bonds = oh_bonds(cluster.positions.reshape(-1, sampling.ATOMS_PER_WATER, 3))
    return bool((bonds < MAX_OH_BOND).all())


def carve_candidates(snapshots: list[Atoms], per_frame: int, min_waters: int, max_waters: int,
                     rng: np.random.Generator) -> list[Atoms]:
    """`per_frame` intact clusters per snapshot, random centres and sizes in [min_waters, max_waters]."""
    candidates = []
    for snapshot in snapshots:
        n_molecules = len(snapshot) // sampling.ATOMS_PER_WATER
        for centre in rng.choice(n_molecules, size=min(per_frame, n_molecules), replace=False):
            cluster = sampling.carve_cluster(snapshot, int(centre), int(rng.integers(min_waters, max_waters + 1)))
            if intact(cluster):
                cluster.info.update(trajectory=snapshot.info["trajectory"], md_step=snapshot.info["md_step"])
                candidates.append(cluster)
    return candidates


def broken_waters(snapshot: Atoms) -> list[int]:
    """Molecule indices of the (O, H, H)-ordered `snapshot` whose O–H bonds (minimum image) are not all
    shorter than MAX_OH_BOND."""
    bonds = oh_bonds(sampling.whole_molecules(snapshot, 0))
    return [int(index) for index in np.flatnonzero((bonds >= MAX_OH_BOND).any(axis=-1))]


def molecular_integrity(frames) -> dict:
    """How molecular (O, H, H)-ordered periodic water frames stayed: the longest intramolecular O–H
    (Å), the shortest O···H and H···H between different molecules (Å; minimum image), the number of
    frames holding a broken water (an O–H of MAX_OH_BOND or longer: see `broken_waters`), and the
    H···H contacts (pairs of different molecules closer than HH_CONTACT) per frame and frames with one."""
    longest, shortest_oh, shortest_hh, broken, contacts, frames_with_contact, count = 0.0, np.inf, np.inf, 0, 0, 0, 0
    for frame in frames:
        molecules = sampling.whole_molecules(frame, 0)
        bonds = oh_bonds(molecules)
        longest, broken, count = max(longest, float(bonds.max())), broken + bool((bonds >= MAX_OH_BOND).any()), count + 1
        hydrogens = molecules[:, 1:].reshape(-1, 3)
        own = np.repeat(np.arange(len(molecules)), 2)  # the molecule of each hydrogen
        _, oh = get_distances(molecules[:, 0], hydrogens, cell=frame.cell, pbc=frame.pbc)
        oh[own, np.arange(len(own))] = np.inf
        shortest_oh = min(shortest_oh, float(oh.min()))
        _, hh = get_distances(hydrogens, cell=frame.cell, pbc=frame.pbc)
        hh[own[:, None] == own[None, :]] = np.inf  # itself and its own molecule's other hydrogen
        shortest_hh = min(shortest_hh, float(hh.min()))
        frame_contacts = int((hh < HH_CONTACT).sum()) // 2
        contacts, frames_with_contact = contacts + frame_contacts, frames_with_contact + bool(frame_contacts)
    return {"frames": count, "longest_OH_bond_angstrom": longest, "shortest_intermolecular_OH_angstrom": shortest_oh,
            "frames_with_broken_water": broken, "shortest_intermolecular_HH_angstrom": shortest_hh,
            "HH_contacts_per_frame": contacts / max(count, 1), "frames_with_HH_contact": frames_with_contact}


def defect_clusters(snapshots: list[Atoms], sizes: list[int]) -> list[Atoms]:
    """Clusters of each size in `sizes` centred on every broken water of each snapshot."""
    clusters = []
    for snapshot in snapshots:
        for centre in broken_waters(snapshot):
            for n_waters in sizes:
                cluster = sampling.carve_cluster(snapshot, centre, n_waters)
                cluster.info.update(trajectory=snapshot.info["trajectory"], md_step=snapshot.info["md_step"])
                clusters.append(cluster)
    return clusters


def write_plan(clusters: list[Atoms], source: str, round_index: int, first_index: int, path: Path) -> None:
    """Number the clusters as plan frames of active-learning round `round_index` from `first_index` on
    and write them."""
    for offset, cluster in enumerate(clusters):
        cluster.info.update(source=source, al_round=round_index, plan_index=first_index + offset,
                            config_id=config_id(cluster))
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, clusters, format="extxyz")


def predicted_forces(model, frames: list[Atoms], mode: str, batch_size: int = 32) -> list[np.ndarray]:
    """Forces (eV/Å) of each frame, [n_atoms, 3] arrays, from `model` in force `mode`."""
    device, dtype = model.reference_energy.device, model.reference_energy.dtype
    forces = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        graph = build_graph(chunk, model.config.cutoff, dtype=dtype, device=device)
        predicted = model(graph, compute_forces=True, mode=mode)["forces"].detach().cpu().double().numpy()
        forces += np.split(predicted, np.cumsum([len(atoms) for atoms in chunk])[:-1])
    return forces


def committee_disagreement(members: list[tuple[torch.nn.Module, str]], frames: list[Atoms]) -> np.ndarray:
    """[n_frames] max over atoms of sqrt(sum_xyz var_k F_k) across the committee's (model, mode) members, eV/Å."""
    per_member = [predicted_forces(model, frames, mode) for model, mode in tqdm(members, desc="committee", unit="model")]
    scores = []
    for index in range(len(frames)):
        stacked = np.stack([forces[index] for forces in per_member])  # [K, n_atoms, 3]
        scores.append(np.sqrt(stacked.var(axis=0).sum(axis=-1)).max())
    return np.asarray(scores)


def select_disputed(candidates: list[Atoms], scores: np.ndarray, n_select: int, per_frame: int) -> list[Atoms]:
    """The highest-scoring candidates, at most `per_frame` from one trajectory frame, best first."""
    chosen, taken = [], {}
    for index in np.argsort(-scores, kind="stable"):
        frame_key = (candidates[index].info["trajectory"], candidates[index].info["md_step"])
        if taken.get(frame_key, 0) >= per_frame:
            continue
        taken[frame_key] = taken.get(frame_key, 0) + 1
        cluster = candidates[index]
        cluster.info["committee_disagreement"] = float(scores[index])
        chosen.append(cluster)
        if len(chosen) == n_select:
            break
    return chosen


def load_committee(paths: list[str], device: str) -> list[tuple[torch.nn.Module, str]]:
    """(model, force mode) of each checkpoint: the mode it was selected in, else conservative."""
    members = []
    for path in paths:
        metadata = model_description(path).get("metadata", {})
        members.append((load_model(path, device=device), metadata.get("metrics", {}).get("force_mode", "conservative")))
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2former_calc.active_learning", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    select = commands.add_parser("select", help="carve, score with a committee, write the most disputed as a plan")
    select.add_argument("trajectories", type=Path, nargs="+", help="MD trajectories (extxyz) of periodic water")
    select.add_argument("--temperatures", type=float, nargs="+", required=True, help="K, one per trajectory")
    select.add_argument("--committee", nargs="+", required=True, help="two or more model names or checkpoint paths")
    select.add_argument("--out", type=Path, required=True)
    select.add_argument("--round", type=int, default=1)
    select.add_argument("--n-select", type=int, default=40)
    select.add_argument("--candidates-per-frame", type=int, default=8)
    select.add_argument("--per-frame", type=int, default=2, help="most selected clusters from one MD frame")
    select.add_argument("--min-waters", type=int, default=4)
    select.add_argument("--max-waters", type=int, default=8)
    select.add_argument("--skip", type=int, default=5, help="trajectory frames to drop at the start")
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--device", default="cpu")
    defects = commands.add_parser("defects", help="clusters around the broken waters of a failed run, as a plan")
    defects.add_argument("trajectory", type=Path, help="MD trajectory (extxyz) of periodic water")
    defects.add_argument("--temperature", type=float, required=True, help="K")
    defects.add_argument("--first-step", type=int, default=0, help="MD step of the first frame to look at")
    defects.add_argument("--last-step", type=int, default=None, help="MD step of the last frame (default: the end)")
    defects.add_argument("--sizes", type=int, nargs="+", default=[6, 8], help="waters per cluster")
    defects.add_argument("--out", type=Path, required=True)
    defects.add_argument("--round", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "defects":
        return select_defects(args)

    if len(args.temperatures) != len(args.trajectories):
        parser.error("give one --temperatures value per trajectory")
    if len(args.committee) < 2:
        parser.error("a committee needs at least two models")
    rng = np.random.default_rng(args.seed)
    candidates = []
    for index, (path, temperature) in enumerate(zip(args.trajectories, args.temperatures)):
        snapshots = trajectory_snapshots(path, temperature, PLAN_INDEX_STRIDE * args.round + index, args.skip)
        candidates += carve_candidates(snapshots, args.candidates_per_frame, args.min_waters, args.max_waters, rng)
    scores = committee_disagreement(load_committee(args.committee, args.device), candidates)
    chosen = select_disputed(candidates, scores, args.n_select, args.per_frame)
    write_plan(chosen, "active-learning", args.round, PLAN_INDEX_STRIDE * args.round, args.out)
    print(f"{len(candidates)} candidates, disagreement median {np.median(scores):.3f} eV/Å, max {scores.max():.3f}; "
          f"wrote the {len(chosen)} most disputed (>= {chosen[-1].info['committee_disagreement']:.3f} eV/Å) to {args.out}")
    return 0


def select_defects(args: argparse.Namespace) -> int:
    """The `defects` command: every frame from --first-step on, clusters around its broken waters."""
    # Numbered (plan index, and seed for the split's groups) from the middle of the round's range:
    # no clash with the committee selection of the same round.
    first_index = PLAN_INDEX_STRIDE * args.round + PLAN_INDEX_STRIDE // 2
    snapshots = trajectory_snapshots(args.trajectory, args.temperature, first_index, 0)
    last = float("inf") if args.last_step is None else args.last_step
    snapshots = [snapshot for snapshot in snapshots if args.first_step <= snapshot.info["md_step"] <= last]
    clusters = defect_clusters(snapshots, args.sizes)
    if not clusters:
        print(f"no broken water in the {len(snapshots)} frames from step {args.first_step} of {args.trajectory}")
        return 1
    write_plan(clusters, "md-failure", args.round, first_index, args.out)
    print(f"{len(clusters)} clusters around broken waters of {len(snapshots)} frames written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
