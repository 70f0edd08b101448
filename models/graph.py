"""The packed batch of atomic systems that the network consumes.

Several systems are concatenated along the atom axis. Edges are stored as a CSR structure
sorted by target atom: the edges of target i are e in [row_ptr[i], row_ptr[i+1]), each with
a source atom j = source_index[e] and an integer cell shift, so that the edge vector is

    r_ij = positions[j] - positions[i] + cell_shift[e] @ cell[system of i]      (Å)

(source j, target i). Storing integer shifts instead of vectors keeps the graph valid when
positions and cell are strained for the stress, and lets autograd reach both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from e2former_calc.kernels.neighbor_attention import TransposedNeighbors, transpose_neighbors
from e2former_calc.kernels.neighbor_attention_reference import target_index_from_row_ptr


def geometric_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b ([..., n, k] times [..., k, m]) as elementwise products summed over k, for the small
    geometric products (vectors and cells, k = 3).

    A matrix product would run on TF32 tensor cores wherever a script allows TF32 for float32
    matmuls, rounding each factor to 10 mantissa bits first: ~0.01 Å on a 20 Å cell, which moved the
    water model's forces by 8.8 meV/Å on average (benchmarks/tf32_accuracy.py). Elementwise
    products are always computed in full precision.
    """
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(dim=-2)


@dataclass(frozen=True)
class TargetChunk:
    """Consecutive target atoms and their edges, which the target-sorted CSR keeps contiguous."""

    atoms: slice
    edges: slice


@dataclass
class AtomicGraph:
    """Atoms and neighbours of B systems packed together (N atoms, E directed edges).

    positions:     [N, 3] float, Å
    atomic_numbers:[N] long
    system_index:  [N] long, which system each atom belongs to (non-decreasing)
    cell:          [B, 3, 3] float, Å, rows are lattice vectors (zeros where not periodic)
    row_ptr:       [N + 1] long, CSR offsets of the edges of each target atom
    source_index:  [E] long, source atom j of each edge
    cell_shift:    [E, 3] float, integer multiples of the lattice vectors added to r_j
    charge:        [B] long, total charge (e)
    spin:          [B] long, spin multiplicity 2S+1
    """

    positions: torch.Tensor
    atomic_numbers: torch.Tensor
    system_index: torch.Tensor
    cell: torch.Tensor
    row_ptr: torch.Tensor
    source_index: torch.Tensor
    cell_shift: torch.Tensor
    charge: torch.Tensor
    spin: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def num_systems(self) -> int:
        return self.cell.shape[0]

    @property
    def num_edges(self) -> int:
        return self.source_index.shape[0]

    @property
    def target_index(self) -> torch.Tensor:
        """[E] long, target atom i of each edge (expanded from row_ptr, cached)."""
        if "target_index" not in self._cache:
            self._cache["target_index"] = target_index_from_row_ptr(self.row_ptr, self.num_edges)
        return self._cache["target_index"]

    def target_chunks(self, max_atoms: int | None = None) -> list[TargetChunk]:
        """The target atoms in chunks of at most `max_atoms`, each with its edges.

        One chunk of everything when `max_atoms` is None or not below N (no host sync then);
        otherwise the chunk boundaries are read back from row_ptr.
        """
        if max_atoms is None or max_atoms >= self.num_atoms:
            return [TargetChunk(slice(0, self.num_atoms), slice(0, self.num_edges))]
        starts = list(range(0, self.num_atoms, max_atoms)) + [self.num_atoms]
        offsets = self.row_ptr[starts].tolist()
        return [TargetChunk(slice(a, b), slice(ea, eb)) for a, b, ea, eb in zip(starts, starts[1:], offsets, offsets[1:])]

    def chunk_row_ptr(self, chunk: TargetChunk) -> torch.Tensor:
        """[atoms + 1] CSR offsets of `chunk`'s atoms into `chunk`'s edges."""
        if chunk.atoms.start == 0 and chunk.atoms.stop == self.num_atoms:
            return self.row_ptr
        return self.row_ptr[chunk.atoms.start : chunk.atoms.stop + 1] - chunk.edges.start

    @property
    def transposed(self) -> TransposedNeighbors:
        """The edges grouped by source atom, for the attention kernel's backward (built once, cached)."""
        if "transposed" not in self._cache:
            self._cache["transposed"] = transpose_neighbors(self.row_ptr, self.source_index)
        return self._cache["transposed"]

    def edge_vectors(self, positions: torch.Tensor | None = None, cell: torch.Tensor | None = None):
        """[E, 3] r_ij = r_j - r_i + shift @ cell, for these (possibly strained) positions/cell."""
        positions = self.positions if positions is None else positions
        cell = self.cell if cell is None else cell
        target = self.target_index
        cell_of_edge = cell.index_select(0, self.system_index[target])  # [E, 3, 3]
        shift = geometric_matmul(self.cell_shift.unsqueeze(1), cell_of_edge).squeeze(1)
        # index_select, not positions[index]: its backward is an index_add, where the backward of
        # advanced indexing sorts the E indices first (45% of an MD step's GPU time on the H100).
        return positions.index_select(0, self.source_index) - positions.index_select(0, target) + shift

    def refill(self, other: "AtomicGraph") -> None:
        """Copy `other`'s tensors into this graph's, in place, cached index structures included.

        Shapes must match. A CUDA graph captured on this graph reads its tensors at the addresses
        the capture recorded, so after a refill its replays evaluate `other`.
        """
        for item in fields(self):
            if item.name == "_cache":
                continue
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if mine.shape != theirs.shape:
                raise ValueError(f"refill needs equal shapes; {item.name} is {tuple(mine.shape)}, got {tuple(theirs.shape)}")
            mine.copy_(theirs)
        if "target_index" in self._cache:
            self._cache["target_index"].copy_(other.target_index)
        if "transposed" in self._cache:
            for mine, theirs in zip(self._cache["transposed"], other.transposed):
                mine.copy_(theirs)

    def to(self, device=None, dtype=None) -> "AtomicGraph":
        """A copy on `device`; float tensors cast to `dtype` (integer tensors keep theirs)."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.is_floating_point():
                return tensor.to(device=device, dtype=dtype)
            return tensor.to(device=device)

        return replace(
            self,
            positions=move(self.positions),
            atomic_numbers=move(self.atomic_numbers),
            system_index=move(self.system_index),
            cell=move(self.cell),
            row_ptr=move(self.row_ptr),
            source_index=move(self.source_index),
            cell_shift=move(self.cell_shift),
            charge=move(self.charge),
            spin=move(self.spin),
            _cache={},
        )
