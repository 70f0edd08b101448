"""Labelled frames for training: extxyz loading, grouped train/val/test splits, device-resident batches.

A frame is one configuration with its DFT labels: an `ase.Atoms` whose `calc.results` (or
`info`/`arrays`) hold `energy` (eV) and `forces` (eV/Å), plus `charge`, `spin` and provenance in
`info`. Each frame has a stable id, the sha256 of its atomic numbers and positions (rounded to
1e-5 Å), so split membership can be recorded and checked independently of file order.

Splits are made over groups of frames, never single frames, when `group_by` names provenance keys:
clusters carved from the same liquid snapshot share molecules, and putting them on both sides of
the split would leak the test set into training. With `stratify_by` (an info key such as "source"),
every stratum is held out in proportion to its size, and a stratum too small to spare whole groups
(five frames of one failed MD run) stays in training rather than filling the test set on its own.

`PackedFrames` builds the neighbour lists of a whole split once and keeps them on the device; a
batch is then a gather of contiguous atom and edge ranges, with no neighbour search per epoch.
"""

from __future__ import annotations

import glob
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, replace

import ase.io
import numpy as np
import torch
from ase import Atoms

from e2former_calc.models.graph import AtomicGraph
from e2former_calc.neighbors import build_graph


def frame_labels(atoms: Atoms) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces [n_atoms, 3] (eV/Å) of a frame, from its calculator results or info/arrays."""
    results = atoms.calc.results if atoms.calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get("forces"))
    if energy is None or forces is None:
        raise ValueError("frame has no 'energy' and 'forces' labels")
    return float(energy), np.asarray(forces, dtype=float)


def frame_id(atoms: Atoms) -> str:
    """Stable id of a configuration: sha256 (first 16 hex digits) of numbers and positions rounded to 1e-5 Å."""
    digest = hashlib.sha256()
    digest.update(np.asarray(atoms.get_atomic_numbers(), dtype="<i8").tobytes())
    digest.update(np.round(atoms.get_positions() * 1e5).astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def cluster_size(atoms: Atoms) -> int:
    """Number of waters: `info["n_waters"]`, else the atom count / 3 for an (H2O)n formula, else -1."""
    if "n_waters" in atoms.info:
        return int(atoms.info["n_waters"])
    numbers = atoms.get_atomic_numbers()
    n_oxygen, n_hydrogen = int(np.sum(numbers == 8)), int(np.sum(numbers == 1))
    return n_oxygen if n_hydrogen == 2 * n_oxygen and n_oxygen * 3 == len(numbers) else -1


def load_frames(patterns: list[str]) -> list[Atoms]:
    """Every frame of the extxyz files matching the glob `patterns` (gzip is fine), files in sorted order.

    Frames are validated (finite energy and forces of the right shape) and exact duplicates (same
    frame id) are dropped, keeping the first. Raises FileNotFoundError when nothing matches.
    """
    paths = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"no data files match {patterns}")
    frames, seen = [], set()
    for path in paths:
        for index, atoms in enumerate(ase.io.read(path, index=":", format="extxyz")):
            where = f"{path} frame {index}"
            try:
                energy, forces = frame_labels(atoms)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            if not np.isfinite(energy) or forces.shape != (len(atoms), 3) or not np.isfinite(forces).all():
                raise ValueError(f"{where}: energy must be finite and forces a finite [{len(atoms)}, 3] array")
            identifier = frame_id(atoms)
            if identifier in seen:
                continue
            seen.add(identifier)
            atoms.info["frame_id"] = identifier
            atoms.info["file"] = path
            frames.append(atoms)
    return frames


def group_key(atoms: Atoms, group_by: list[str]) -> str:
    """sha256 of the frame's `info[key]` for `key` in `group_by`, or of its frame id when `group_by`
    is empty or a key is missing: frames with equal keys are split together."""
    if group_by and all(key in atoms.info for key in group_by):
        key = repr(tuple(str(atoms.info[key]) for key in group_by))
    else:
        key = atoms.info.get("frame_id") or frame_id(atoms)
    return hashlib.sha256(key.encode()).hexdigest()


def split_frames(
    frames: list[Atoms],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    group_by: list[str],
    stratify_by: str | None = None,
) -> dict[str, list[int]]:
    """Disjoint train/val/test index lists over `frames`, drawn by group.

    A frame's group is the tuple of its `info[key]` for `key` in `group_by`, or its own frame id
    when `group_by` is empty or a key is missing. Groups are ordered by a hash of their key (not by
    file order) and shuffled with `seed`; then, group by group in that order, test and then
    validation take whole groups, and training takes the rest. Each list is sorted.

    Without `stratify_by`, test and validation take groups until they hold at least their fraction
    of all frames (the last group may overshoot it); this rule is kept so recorded splits reproduce.

    With `stratify_by`, a frame's stratum is `str(info.get(stratify_by))` ("None" for frames without
    the key). Test (validation) takes a group only if it then holds at most
    floor(test_fraction (val_fraction) x stratum size) frames of every stratum the group touches;
    groups that fit nowhere go to training. So each stratum is held out in proportion, never above
    its fraction, and a stratum too small for that (one group, or fewer frames than 1 / fraction)
    trains entirely. Groups stay whole even when they span strata (dimers carved from a liquid
    snapshot): such a group must fit the budgets of all its strata.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and a sum < 1; got {val_fraction}, {test_fraction}")
    groups: dict[str, list[int]] = {}
    for index, atoms in enumerate(frames):
        groups.setdefault(group_key(atoms, group_by), []).append(index)
    order = sorted(groups)
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]

    split = {"train": [], "val": [], "test": []}
    fractions = {"test": test_fraction, "val": val_fraction}
    stratum = [str(atoms.info.get(stratify_by)) for atoms in frames] if stratify_by is not None else [""] * len(frames)
    stratum_sizes = Counter(stratum)
    taken = {name: Counter() for name in split}  # frames per stratum in each subset so far

    def takes(name: str, group_strata: Counter) -> bool:
        """Whether held-out subset `name` takes a group with `group_strata` frames per stratum."""
        if stratify_by is None:
            return len(split[name]) < fractions[name] * len(frames)
        # at most floor(fraction x stratum size) frames of each stratum (+1e-9: 0.29 * 100 is 28.999...)
        return all(taken[name][s] + count <= math.floor(fractions[name] * stratum_sizes[s] + 1e-9)
                   for s, count in group_strata.items())

    for key in order:
        group_strata = Counter(stratum[k] for k in groups[key])
        name = next((name for name in ("test", "val") if takes(name, group_strata)), "train")
        split[name].extend(groups[key])
        taken[name].update(group_strata)
    return {name: sorted(indices) for name, indices in split.items()}


def extend_split(frames: list[Atoms], recorded: dict[str, list[str]], **rule) -> dict[str, list[int]]:
    """A recorded split kept as it was, and the frames it does not list split among themselves.

    `recorded` maps "train", "val" and "test" to frame ids (a training run's split.json). Its frames
    stay in their subset, so new data never moves a test frame into training; a new frame whose
    group (`group_key` with rule["group_by"]) already has a recorded frame joins that frame's subset,
    so groups stay whole; the other new frames are split by `split_frames(new_frames, **rule)` (rule:
    val_fraction, test_fraction, seed, group_by, stratify_by). Raises ValueError when a recorded
    frame is missing from `frames` (the data lost frames) or `recorded` lacks one of the three lists.
    """
    if not all(isinstance(recorded.get(name), list) for name in ("train", "val", "test")):
        raise ValueError(f"a recorded split needs 'train', 'val' and 'test' lists of frame ids; got keys {sorted(recorded)}")
    group_by = rule["group_by"]
    subset_of_id = {frame: name for name in ("train", "val", "test") for frame in recorded[name]}
    present = {atoms.info["frame_id"] for atoms in frames}
    missing = sorted(set(subset_of_id) - present)
    if missing:
        raise ValueError(f"{len(missing)} frames of the recorded split are not in the data (first: {missing[0]})")
    subset_of_group = {group_key(atoms, group_by): subset_of_id[atoms.info["frame_id"]]
                       for atoms in frames if atoms.info["frame_id"] in subset_of_id}
    split = {"train": [], "val": [], "test": []}
    new = []
    for index, atoms in enumerate(frames):
        name = subset_of_id.get(atoms.info["frame_id"]) or subset_of_group.get(group_key(atoms, group_by))
        if name:
            split[name].append(index)
        else:
            new.append(index)
    new_split = split_frames([frames[k] for k in new], **rule)
    for name, indices in new_split.items():
        split[name].extend(new[k] for k in indices)
    return {name: sorted(indices) for name, indices in split.items()}


def element_counts(frames: list[Atoms], species: tuple[int, ...]) -> np.ndarray:
    """[n_frames, len(species)] number of atoms of each species in each frame."""
    counts = np.zeros((len(frames), len(species)))
    column = {z: k for k, z in enumerate(species)}
    for row, atoms in enumerate(frames):
        for z in atoms.get_atomic_numbers():
            if int(z) not in column:
                raise ValueError(f"frame {atoms.info.get('frame_id')} has element Z={z}, not in the model's species {species}")
            counts[row, column[int(z)]] += 1
    return counts


def fit_reference_energies(counts: np.ndarray, energies: np.ndarray) -> tuple[np.ndarray, int]:
    """Least-squares per-element energies e [K] (eV) with energies [S] ≈ counts [S, K] @ e.

    Returns (e, rank). When the compositions do not determine every element (pure water: H is
    always twice O), the minimum-norm solution is returned; it still fits the total energies of
    every composition in the span of the data.
    """
    solution, _, rank, _ = np.linalg.lstsq(counts, energies, rcond=None)
    return solution, int(rank)


@dataclass
class Batch:
    """A packed batch of B frames with N atoms: graph, energy [B] (eV, float64), forces [N, 3] (eV/Å), n_atoms [B]."""

    graph: AtomicGraph
    energy: torch.Tensor
    forces: torch.Tensor
    n_atoms: torch.Tensor


class PackedFrames:
    """All frames of one split packed into a single `AtomicGraph` that lives on `device`.

    Neighbour lists are built once here; `batch(indices)` gathers the atoms and edges of the chosen
    frames (each frame's atoms and edges are contiguous because edges are sorted by target atom).
    """

    def __init__(self, frames: list[Atoms], cutoff: float, dtype: torch.dtype, device: torch.device | str):
        self.frames = frames
        self.graph = build_graph(frames, cutoff, dtype=dtype, device=device)
        labels = [frame_labels(atoms) for atoms in frames]
        self.energy = torch.tensor([energy for energy, _ in labels], dtype=torch.float64, device=device)
        self.forces = torch.as_tensor(np.concatenate([forces for _, forces in labels]), dtype=dtype, device=device)
        self.n_atoms = torch.tensor([len(atoms) for atoms in frames], dtype=torch.long, device=device)
        self.atom_start = torch.cumsum(self.n_atoms, 0) - self.n_atoms
        self.degree = self.graph.row_ptr[1:] - self.graph.row_ptr[:-1]

    def __len__(self) -> int:
        return len(self.frames)

    def batch(self, indices: torch.Tensor) -> Batch:
        """The frames `indices` ([B] long, on any device) as one packed `Batch`."""
        g = self.graph
        indices = indices.to(self.n_atoms.device)
        n_atoms, old_start = self.n_atoms[indices], self.atom_start[indices]
        atoms = _concatenated_ranges(old_start, n_atoms)
        edge_start = g.row_ptr[old_start]
        edge_count = g.row_ptr[old_start + n_atoms] - edge_start
        edges = _concatenated_ranges(edge_start, edge_count)
        new_start = torch.cumsum(n_atoms, 0) - n_atoms
        # Every edge of a frame has its source inside that frame: shift by the frame's new offset.
        source = g.source_index[edges] - torch.repeat_interleave(old_start - new_start, edge_count)
        row_ptr = torch.cat([torch.zeros_like(n_atoms[:1]), torch.cumsum(self.degree[atoms], 0)])
        graph = replace(
            g,
            positions=g.positions[atoms],
            atomic_numbers=g.atomic_numbers[atoms],
            system_index=torch.repeat_interleave(torch.arange(len(indices), device=n_atoms.device), n_atoms),
            cell=g.cell[indices],
            row_ptr=row_ptr,
            source_index=source,
            cell_shift=g.cell_shift[edges],
            charge=g.charge[indices],
            spin=g.spin[indices],
            _cache={},
        )
        return Batch(graph, self.energy[indices], self.forces[atoms], n_atoms)


def _concatenated_ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """cat([arange(s, s + c) for s, c in zip(starts, counts)]) without a Python loop."""
    offsets = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    return torch.repeat_interleave(starts - offsets, counts, output_size=total) + torch.arange(total, device=starts.device)
