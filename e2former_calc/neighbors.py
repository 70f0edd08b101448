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
"""

from __future__ import annotations

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
    positions = wrapped_positions(atoms)
    lowest = positions.min(axis=0)
    extent = max(float((positions - lowest).max()), 1e-12)
    levels = 2**MORTON_BITS_PER_AXIS - 1
    grid = np.rint((positions - lowest) / extent * levels).astype(np.uint64)
    code = np.zeros(len(atoms), dtype=np.uint64)
    for bit in range(MORTON_BITS_PER_AXIS):
        for axis in range(3):
            code |= ((grid[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + axis)
    return np.argsort(code, kind="stable")


def wrapped_positions(atoms: Atoms) -> np.ndarray:
    """[n, 3] positions (Å) wrapped into the cell along the periodic axes only."""
    positions = atoms.get_positions()
    pbc = atoms.get_pbc()
    if not pbc.any():
        return positions
    box = _completed_cell(atoms.cell.array, pbc)
    fractional = np.linalg.solve(box.T, positions.T).T
    fractional[:, pbc] -= np.floor(fractional[:, pbc])
    return fractional @ box


def neighbor_pairs(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Directed pairs (target i, source j, integer shift S) with |r_j + S @ cell - r_i| < cutoff.

    positions [n, 3] and cell [3, 3] in Å (numpy, float64), pbc [3] bool. Returns long tensors
    i [P], j [P], S [P, 3] on `device`, sorted by i then j; both directions of a pair present.
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
        # The GPU search returns pairs in no fixed order; sort them so that the CSR is valid and
        # the summation order (hence the result) is reproducible.
        order = torch.argsort(target.long() * len(positions) + source.long(), stable=True)
        return target[order].long(), source[order].long(), shift[order].long()
    search = NeighborList(cutoff=cutoff, full_list=True, sorted=True)
    target, source, shift = search.compute(
        points=positions, box=box, periodic=pbc.tolist(), quantities="ijS"
    )
    return tuple(torch.as_tensor(a.astype(np.int64), device=device) for a in (target, source, shift))


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
