"""From `ase.Atoms` to the packed `AtomicGraph` tensors the network consumes.

For B systems with n_b atoms each (N = Σ n_b atoms, E directed edges in all):

    positions       [N, 3]    float  Å. `atoms.positions` wrapped into the cell along periodic
                                     axes, then shifted so each system's centroid is at the
                                     origin: energy, forces and stress are translation invariant,
                                     and small coordinates keep float32 accurate.
    atomic_numbers  [N]       long   `atoms.numbers`
    system_index    [N]       long   b for every atom of system b
    cell            [B, 3, 3] float  Å, `atoms.cell` rows, zeroed along non-periodic axes
    row_ptr         [N + 1]   long   CSR offsets: the edges of target atom i are
                                     row_ptr[i] <= e < row_ptr[i + 1]
    source_index    [E]       long   source atom j of edge e (index into the packed atoms)
    cell_shift      [E, 3]    float  integer lattice shift S of edge e
    charge, spin    [B]       long   `atoms.info["charge"]` (default 0) and
                                     `atoms.info["spin"]` (multiplicity 2S+1, default 1)

The edge vector is r_ij = r_j - r_i + S @ cell (source j, target i); the graph holds every pair
with |r_ij| < cutoff, periodic images and an atom's own images included, with no cap on their
number (a cap would make the energy discontinuous).

Atom order: `build_graph` can place each system's atoms in an order given by the caller;
`spatial_order` gives a Morton (Z-order) permutation, so that atoms close in space are close in
memory and the neighbour gathers of the GPU kernels stay local. Per-atom results must then be
put back with the inverse permutation (the calculator does).

Neighbour search: vesin on the CPU. For a CUDA device the search runs on the GPU with
vesin-torch when it is installed, otherwise on the CPU followed by a copy. The search always
runs in float64, whatever the model's dtype.

MD evaluates one system over and over: `VerletGraphBuilder` builds the same graph as
`build_graph` from a Verlet neighbour list (pairs within cutoff + skin, searched again only
after some atom has moved more than skin / 2) and keeps the per-system constants on the device.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Integral, Real
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from vesin import NeighborList

from e2former_calc.models.graph import AtomicGraph

try:  # vesin-torch is optional (the `gpu` extra)
    from vesin_torch import NeighborList as TorchNeighborList
except ImportError:
    TorchNeighborList = None

MORTON_BITS_PER_AXIS = 10
# static_graph holds this many times the edges of the search that built it (the rest are far
# self-images), so that later searches refill the same graph and a CUDA graph is captured once.
EDGE_CAPACITY_MARGIN = 1.05


def validate_atoms(atoms: Atoms) -> None:
    """Raise ValueError with an actionable message for inputs no model can evaluate."""
    if len(atoms) == 0:
        raise ValueError("the Atoms object is empty: there is nothing to evaluate")
    positions = atoms.get_positions()
    if not np.all(np.isfinite(positions)):
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        raise ValueError(f"positions contain NaN or inf (atoms {bad[:10].tolist()})")
    pbc = atoms.get_pbc()
    cell = atoms.cell.array
    for axis in np.flatnonzero(pbc):
        if np.linalg.norm(cell[axis]) < 1e-8:
            raise ValueError(
                f"pbc is True along axis {axis} but the cell vector there is zero; "
                "set a cell (atoms.set_cell) or turn periodicity off (atoms.pbc = False)"
            )
    if pbc.any() and abs(np.linalg.det(_completed_cell(cell, pbc))) < 1e-8:
        raise ValueError("the periodic cell is degenerate (zero volume)")


def read_charge_spin(atoms: Atoms) -> tuple[int, int]:
    """Total charge (e) and spin multiplicity 2S+1 from `atoms.info`, defaults 0 and 1.

    Raises ValueError for values that are not integers or a multiplicity below 1.
    """
    charge = _as_integer(atoms.info.get("charge", 0), 'atoms.info["charge"]')
    spin = _as_integer(atoms.info.get("spin", 1), 'atoms.info["spin"]')
    if spin < 1:
        raise ValueError(
            f'atoms.info["spin"] is the spin multiplicity 2S+1 and must be at least 1, got {spin}'
        )
    return charge, spin


def spatial_order(atoms: Atoms) -> np.ndarray:
    """[n] permutation that sorts the atoms along a Morton curve of their wrapped positions."""
    return _morton_order(wrapped_positions(atoms))


def _morton_order(positions: np.ndarray) -> np.ndarray:
    """[n] stable argsort of the Morton codes of `positions` [n, 3] (Å) on a 2^10 grid per axis:
    bit b of axis a goes to bit 3b + a of the code."""
    lowest = positions.min(axis=0)
    extent = max(float((positions - lowest).max()), 1e-12)
    levels = 2**MORTON_BITS_PER_AXIS - 1
    grid = np.rint((positions - lowest) / extent * levels).astype(np.uint64)
    spread = grid & np.uint64(0x3FF)  # insert two zero bits between the ten bits of each axis
    for shift, mask in ((16, 0x30000FF), (8, 0x300F00F), (4, 0x30C30C3), (2, 0x9249249)):
        spread = (spread | (spread << np.uint64(shift))) & np.uint64(mask)
    code = spread[:, 0] | (spread[:, 1] << np.uint64(1)) | (spread[:, 2] << np.uint64(2))
    return np.argsort(code, kind="stable")


def wrapped_positions(atoms: Atoms) -> np.ndarray:
    """[n, 3] positions (Å) wrapped into the cell along the periodic axes only."""
    return _wrap(atoms.get_positions(), atoms.cell.array, atoms.get_pbc())[0]


def _wrap(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`positions` [n, 3] (Å) wrapped into the cell along the periodic axes, and the integer
    images [n, 3] (float64) that were removed: wrapped ≈ positions - images @ cell."""
    images = np.zeros_like(positions)
    if not pbc.any():
        return positions, images
    box = _completed_cell(cell, pbc)
    fractional = np.linalg.solve(box.T, positions.T).T
    images[:, pbc] = np.floor(fractional[:, pbc])
    fractional[:, pbc] -= images[:, pbc]
    return fractional @ box, images


def neighbor_pairs(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Directed pairs (target i, source j, integer shift S) with |r_j + S @ cell - r_i| < cutoff.

    positions [n, 3] and cell [3, 3] in Å (numpy, float64), pbc [3] bool. Returns long tensors
    i [P], j [P], S [P, 3] on `device`, sorted by i then j (the images of one pair, which only
    cells thinner than twice the cutoff have, in the search's order); both directions present.
    """
    device = torch.device(device)
    box = _completed_cell(cell, pbc)
    if device.type == "cuda" and TorchNeighborList is not None:
        search = TorchNeighborList(cutoff=cutoff, full_list=True, sorted=False)
        target, source, shift = search.compute(
            points=torch.as_tensor(positions, dtype=torch.float64, device=device),
            box=torch.as_tensor(box, dtype=torch.float64, device=device),
            periodic=torch.as_tensor(pbc, dtype=torch.bool, device=device),
            quantities="ijS",
        )
    else:
        search = NeighborList(cutoff=cutoff, full_list=True, sorted=False)
        pairs = search.compute(points=positions, box=box, periodic=pbc.tolist(), quantities="ijS")
        target, source, shift = (torch.as_tensor(a.astype(np.int64), device=device) for a in pairs)
    # Sort by (i, j) on every device: the CSR needs i sorted, and a fixed order of the edges
    # fixes the summation order, hence the result to the last bit.
    target, source, shift = target.long(), source.long(), shift.long()
    order = torch.argsort(target * len(positions) + source, stable=True)
    return target[order], source[order], shift[order]


def build_graph(
    atoms_list: Sequence[Atoms],
    cutoff: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    atom_order: Sequence[np.ndarray] | None = None,
) -> AtomicGraph:
    """Pack `atoms_list` into one `AtomicGraph` (shapes and units in the module docstring).

    `atom_order[b]`, if given, is a permutation of system b's atoms: graph atom k of that system
    is `atoms_list[b][atom_order[b][k]]`. Raises ValueError for invalid Atoms (see
    `validate_atoms`) and invalid charge/spin (see `read_charge_spin`).
    """
    device = torch.device(device)
    positions, numbers, system_index, cells = [], [], [], []
    row_counts, sources, shifts, charges, spins = [], [], [], [], []
    offset = 0
    for system, atoms in enumerate(atoms_list):
        validate_atoms(atoms)
        charge, spin = read_charge_spin(atoms)
        order = np.arange(len(atoms)) if atom_order is None else np.asarray(atom_order[system])
        if not np.array_equal(np.sort(order), np.arange(len(atoms))):
            raise ValueError(f"atom_order[{system}] is not a permutation of the {len(atoms)} atoms")
        system_positions = wrapped_positions(atoms)[order]
        system_positions -= system_positions.mean(axis=0)
        pbc = atoms.get_pbc()
        target, source, shift = neighbor_pairs(system_positions, atoms.cell.array, pbc, cutoff, device)
        positions.append(system_positions)
        numbers.append(atoms.get_atomic_numbers()[order])
        system_index.append(np.full(len(atoms), system))
        cells.append(atoms.cell.array * pbc[:, None])
        row_counts.append(torch.bincount(target, minlength=len(atoms)))
        sources.append(source + offset)
        shifts.append(shift)
        charges.append(charge)
        spins.append(spin)
        offset += len(atoms)
    counts = torch.cat(row_counts)
    row_ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, dim=0)])

    def tensor(array, tensor_dtype):
        return torch.as_tensor(np.asarray(array), dtype=tensor_dtype, device=device)

    return AtomicGraph(
        positions=tensor(np.concatenate(positions), dtype),
        atomic_numbers=tensor(np.concatenate(numbers), torch.long),
        system_index=tensor(np.concatenate(system_index), torch.long),
        cell=tensor(np.stack(cells), dtype),
        row_ptr=row_ptr,
        source_index=torch.cat(sources),
        cell_shift=torch.cat(shifts).to(dtype),
        charge=tensor(charges, torch.long),
        spin=tensor(spins, torch.long),
    )


def _far_image_shift(atoms: Atoms, reach: float) -> np.ndarray | None:
    """[3] integer shift n e_k along the first periodic axis k with |n a_k| > `reach` (Å), or None
    for a system without a periodic axis."""
    for axis in np.flatnonzero(atoms.get_pbc()):
        shift = np.zeros(3)
        shift[axis] = math.floor(reach / np.linalg.norm(atoms.cell.array[axis])) + 1
        return shift
    return None


def with_edge_capacity(graph: AtomicGraph, capacity: int, far_shift: np.ndarray) -> AtomicGraph:
    """`graph` with `capacity` edges: the E it has, then capacity - E padding edges spread evenly
    over the atoms, each from an atom to its own periodic image `far_shift` (lattice units) away,
    beyond the cutoff, where the envelope makes every contribution exactly zero."""
    num_atoms, num_edges = graph.num_atoms, graph.num_edges
    padding = capacity - num_edges
    if padding < 0:
        raise ValueError(f"capacity {capacity} is below the graph's {num_edges} edges")
    device = graph.row_ptr.device
    atoms = torch.arange(num_atoms, device=device)
    pad_counts = torch.full((num_atoms,), padding // num_atoms, device=device)
    pad_counts[: padding % num_atoms] += 1
    counts = graph.row_ptr.diff()
    row_ptr = torch.cat([graph.row_ptr.new_zeros(1), torch.cumsum(counts + pad_counts, dim=0)])
    target = graph.target_index
    real_slots = row_ptr[target] + torch.arange(num_edges, device=device) - graph.row_ptr[target]
    pad_target = torch.repeat_interleave(atoms, pad_counts)
    pad_rank = torch.arange(padding, device=device) - (torch.cumsum(pad_counts, dim=0) - pad_counts)[pad_target]
    pad_slots = row_ptr[pad_target] + counts[pad_target] + pad_rank
    source_index = graph.source_index.new_empty(capacity)
    source_index[real_slots], source_index[pad_slots] = graph.source_index, pad_target
    cell_shift = graph.cell_shift.new_empty(capacity, 3)
    cell_shift[real_slots] = graph.cell_shift
    cell_shift[pad_slots] = torch.as_tensor(far_shift, dtype=cell_shift.dtype, device=device)
    return replace(graph, row_ptr=row_ptr, source_index=source_index, cell_shift=cell_shift, _cache={})


class VerletGraphBuilder:
    """The `AtomicGraph` of one system, call after call (an MD run), from a Verlet list.

    Pairs are searched within `cutoff + skin` (Å) and kept until some atom has moved more than
    skin / 2 from where it was at that search, or the number of atoms, the elements, the cell,
    pbc, charge or spin change; every call keeps the stored pairs with |r_ij| < cutoff (float64)
    in the current positions. A pair within the cutoff now was within cutoff + skin at the
    search, so no pair is missed. The graph is the one `build_graph([atoms], cutoff, dtype,
    device, atom_order=[order])` builds, tensor for tensor, with `order` the Morton order
    (`spatial_sort=True`) or the identity: same positions (wrapped, centred), same edges in the
    same order, same integer shifts. The one exception is a pair of atoms with several periodic
    images within the cutoff (cells thinner than 2 (cutoff + skin)): its edges may come in
    another order, which changes the results by rounding only. `skin=0` searches on every call.

    Per call the host computes the atom order and wrapped positions ([n, 3], n atoms) and sends
    them, with the integer images the wrap removed, to `device`; the pair list ([P] indices and
    [P, 3] shifts), elements, cell, charge and spin stay there between searches. `searches`
    counts the neighbour searches done.

    `static_graph` is the variant for replaying a captured CUDA graph: a graph object whose tensors
    change in place, its positions at every call and, for periodic systems, its pairs at a search
    too (padded to a fixed number of edges with far self-images; a new object only when a search
    finds more pairs than it holds). `static_builds` counts the objects it made.
    """

    def __init__(
        self,
        cutoff: float,
        skin: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        spatial_sort: bool = True,
    ):
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        if not skin >= 0:
            raise ValueError(f"skin must be zero or positive (Å), got {skin}")
        self.cutoff, self.skin, self.dtype = float(cutoff), float(skin), dtype
        self.device = torch.device(device)
        self.spatial_sort = spatial_sort
        self.searches = 0
        self.static_builds = 0  # graph objects static_graph made; its other searches refilled the last one
        self._key = None  # (numbers, cell, pbc, charge, spin) of the stored search
        self._static = None  # static_graph's (graph, order, graph positions, Atoms positions) at its build

    def __call__(self, atoms: Atoms) -> tuple[AtomicGraph, np.ndarray]:
        """The graph of `atoms` and its atom order [n] (graph atom k is atoms[order[k]]).

        Raises ValueError for invalid Atoms or charge/spin, like `build_graph`.
        """
        return self._build(atoms, keep_all_pairs=False)

    def static_graph(self, atoms: Atoms) -> tuple[AtomicGraph, np.ndarray, bool]:
        """(graph, order, new): the graph of `atoms` with a shape fixed between searches.

        Between two searches this returns the same graph object, with every stored pair (those
        beyond the cutoff contribute exactly zero: the envelope and its derivative vanish there)
        and the same atom order; only its positions change, in place, to where the atoms were at
        the search plus their displacement since (not wrapped again, so the stored shifts stay
        valid). `new` is True after a search: the pairs, order and positions are then new too,
        in the same object refilled (periodic systems, while the pairs fit its edge capacity) or
        in a new one. Energies and forces equal `__call__`'s up to rounding.
        """
        validate_atoms(atoms)
        positions = atoms.get_positions()
        if self._static is not None and self._search_key(atoms) == self._key and not self._moved_beyond_half_skin(positions):
            graph, order, start, reference = self._static
            moved = start + (positions - reference)[order]
            graph.positions.copy_(torch.as_tensor(moved, dtype=self.dtype))
            return graph, order, False
        graph, order = self._build(atoms, keep_all_pairs=True)
        far_shift = _far_image_shift(atoms, self.cutoff + self.skin)
        held = None if self._static is None else self._static[0]
        if far_shift is None:  # nothing to pad with (no periodic axis): a new graph at every search
            self.static_builds += 1
        elif held is not None and held.num_atoms == graph.num_atoms and held.num_edges >= graph.num_edges:
            held.refill(with_edge_capacity(graph, held.num_edges, far_shift))
            graph = held
        else:
            graph = with_edge_capacity(graph, math.ceil(EDGE_CAPACITY_MARGIN * graph.num_edges), far_shift)
            self.static_builds += 1
        start = graph.positions.detach().cpu().numpy().astype(np.float64)  # a copy: the graph's positions change in place
        self._static = (graph, order, start, positions)
        return graph, order, True

    @staticmethod
    def _search_key(atoms: Atoms) -> tuple:
        """What must not change between searches: elements, cell, pbc, charge and spin."""
        charge, spin = read_charge_spin(atoms)
        return (atoms.numbers.tobytes(), atoms.cell.array.tobytes(), atoms.get_pbc().tobytes(), charge, spin)

    def _build(self, atoms: Atoms, keep_all_pairs: bool) -> tuple[AtomicGraph, np.ndarray]:
        validate_atoms(atoms)
        charge, spin = read_charge_spin(atoms)
        positions, cell, pbc = atoms.get_positions(), atoms.cell.array, atoms.get_pbc()
        wrapped, images = _wrap(positions, cell, pbc)
        order = _morton_order(wrapped) if self.spatial_sort else np.arange(len(atoms))
        graph_positions = wrapped[order]
        graph_positions -= graph_positions.mean(axis=0)
        key = self._search_key(atoms)
        if key != self._key or self._moved_beyond_half_skin(positions):
            self._search(atoms, positions, images, order, graph_positions, pbc, charge, spin)
            self._key = key

        device = self.device
        positions64 = torch.as_tensor(graph_positions, dtype=torch.float64, device=device)
        order_t = torch.as_tensor(order, device=device)
        rank = torch.empty_like(order_t)
        rank[order_t] = torch.arange(len(order), device=device)
        images_t = torch.as_tensor(images, device=device).long()
        first, second = self._first, self._second
        shift = self._unwrapped_shift + images_t[second] - images_t[first]
        target, source = rank[first], rank[second]
        if self.skin > 0 and not keep_all_pairs:
            vector = positions64[source] - positions64[target] + shift.double() @ self._cell64
            inside = torch.nonzero((vector * vector).sum(dim=1) < self.cutoff**2).squeeze(1)
            target, source, shift = target[inside], source[inside], shift[inside]
        by_edge = torch.argsort(target * len(order) + source, stable=True)
        target, source, shift = target[by_edge], source[by_edge], shift[by_edge]
        row_ptr = torch.searchsorted(target, torch.arange(len(order) + 1, device=device))
        graph = AtomicGraph(
            positions=positions64.to(self.dtype),
            atomic_numbers=self._numbers[order_t],
            system_index=self._system_index,
            cell=self._cell,
            row_ptr=row_ptr,
            source_index=source,
            cell_shift=shift.to(self.dtype),
            charge=self._charge,
            spin=self._spin,
        )
        return graph, order

    def _moved_beyond_half_skin(self, positions: np.ndarray) -> bool:
        if self.skin == 0:
            return True
        displacement = positions - self._reference_positions
        return bool(np.einsum("ij,ij->i", displacement, displacement).max() > (self.skin / 2) ** 2)

    def _search(self, atoms, positions, images, order, graph_positions, pbc, charge, spin) -> None:
        """Store the pairs within cutoff + skin as atom indices (first i, second j) and the
        shift T [P, 3] between unwrapped positions: r_ij = r_j - r_i + T @ cell."""
        device = self.device
        target, source, shift = neighbor_pairs(
            graph_positions, atoms.cell.array, pbc, self.cutoff + self.skin, device
        )
        order_t = torch.as_tensor(order, device=device)
        images_t = torch.as_tensor(images, device=device).long()
        self._first, self._second = order_t[target], order_t[source]
        self._unwrapped_shift = shift - images_t[self._second] + images_t[self._first]
        self._reference_positions = positions.copy()
        cell = atoms.cell.array * pbc[:, None]
        self._cell64 = torch.as_tensor(cell, dtype=torch.float64, device=device)
        self._cell = torch.as_tensor(cell[None], dtype=self.dtype, device=device)
        self._numbers = torch.as_tensor(atoms.get_atomic_numbers(), dtype=torch.long, device=device)
        self._system_index = torch.zeros(len(atoms), dtype=torch.long, device=device)
        self._charge = torch.tensor([charge], dtype=torch.long, device=device)
        self._spin = torch.tensor([spin], dtype=torch.long, device=device)
        self.searches += 1


def _as_integer(value, name: str) -> int:
    """`value` as an int if it is integer-valued (1, 1.0, numpy integers), else ValueError."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _completed_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The cell with zero vectors along non-periodic axes replaced by orthogonal unit vectors.

    vesin wants an invertible box even for directions that are not periodic; those vectors
    are never used to make images.
    """
    cell = np.array(cell, dtype=float)
    if not pbc.any():
        return np.zeros((3, 3))
    for axis in range(3):
        if not pbc[axis] and np.linalg.norm(cell[axis]) < 1e-8:
            others = [cell[a] for a in range(3) if a != axis]
            normal = np.cross(others[0], others[1])
            if np.linalg.norm(normal) < 1e-8:
                normal = np.eye(3)[axis]
            cell[axis] = normal / np.linalg.norm(normal)
    return cell
