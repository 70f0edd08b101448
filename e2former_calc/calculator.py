"""ASE calculator for E2Former-V2.

    from e2former_calc import E2FormerCalculator
    atoms.calc = E2FormerCalculator("e2former-v2-water-s")      # or a checkpoint path, or a model
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

Properties: energy and free_energy (eV, equal: the model has no electronic entropy), energies
(per atom, eV), forces (eV/Å) and, for cells periodic in all three directions, stress (eV/Å^3,
ASE's Voigt order and sign). In mode="conservative" forces are -dE/dr and the stress is the
strain derivative of the energy over the volume; mode="direct" takes forces from the force head
(faster, not conservative) and gives no stress.

Total charge and spin multiplicity are read from atoms.info["charge"] and atoms.info["spin"]
(defaults 0 and 1) and are part of the state: changing them invalidates cached results.

For MD pass `skin` (Å, e.g. 1.0): the calculator then keeps a Verlet neighbour list between
calls and searches again only after some atom has moved more than skin / 2; the graph, hence
every result, is the same as with a search on every call, bit for bit in cells at least
2 (cutoff + skin) thick and up to rounding in thinner ones (`VerletGraphBuilder`).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from e2former_calc.checkpoint import load_model, resolve_device, resolve_dtype
from e2former_calc.cuda_graph import CapturedModel
from e2former_calc.neighbors import (
    VerletGraphBuilder,
    build_graph,
    read_charge_spin,
    spatial_order,
    validate_atoms,
)
from e2former_calc.models.graph import AtomicGraph

MODES = ("conservative", "direct")
INFO_KEYS = ("charge", "spin")


def reduced_matmul_precision(device: torch.device, dtype: torch.dtype) -> str | None:
    """The reduced precision ("tf32", ...) that float32 matrix products on `device` are allowed to
    use, or None when they run in full float32 (or on the CPU, or in float64)."""
    if device.type != "cuda" or dtype != torch.float32:
        return None
    precision = torch.backends.cuda.matmul.fp32_precision  # reflects the legacy allow_tf32 flag too
    return None if precision in ("none", "ieee") else precision


def md_acceleration(device: str | torch.device, skin: float | None = None, cuda_graph: str = "auto") -> tuple[float, bool]:
    """(skin in Å, cuda_graph) for an MD run's calculator.

    `cuda_graph` "auto" replays captured CUDA graphs on a CUDA device (unless skin is 0), "on"
    and "off" force it. The default skin is 0.5 Å with CUDA graphs (a captured graph holds every
    pair within cutoff + skin: a small skin means fewer idle pairs per step) and 1 Å without
    (eager steps keep only the pairs within the cutoff, so fewer searches win).
    """
    if cuda_graph not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graph must be 'auto', 'on' or 'off', got {cuda_graph!r}")
    graphed = cuda_graph == "on" or (cuda_graph == "auto" and resolve_device(device).type == "cuda" and skin != 0)
    return (skin if skin is not None else 0.5 if graphed else 1.0), graphed


class E2FormerCalculator(Calculator):
    """E2Former-V2 energies, forces and stress for ASE.

    model:  a registered name (see `e2former_calc.checkpoint.registered_models()`), a checkpoint
            path, or an `E2FormerV2` instance (moved to `device`/`dtype` in place and put in eval mode).
    device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:<k>".
    dtype:  "float32" or "float64".
    mode:   "conservative" (forces = -dE/dr, stress available) or "direct" (force head).
    spatial_sort: evaluate the atoms in Morton order (local neighbour gathers on the GPU);
            results are always returned in the order of the Atoms.
    skin:   Å; above 0, single-system calculations reuse a Verlet neighbour list searched within
            cutoff + skin until some atom has moved more than skin / 2 (same results, fewer
            searches in MD). 0 searches on every call. `calculate_batch` always searches.
    recompute: conservative mode keeps only each block's input for the force pass and recomputes
            the block's activations there, chunk of atoms by chunk for systems above
            `chunk_atoms` (the same results; less GPU memory for the largest systems, at
            the cost of a second forward pass through the blocks).
    chunk_atoms: target atoms per chunk when the network goes chunk by chunk (with `recompute`, or
            without autograd: direct mode); None keeps the model's default (16,384). Smaller
            chunks hold fewer activations at once (the peak of a recomputed block scales with
            it), at the cost of more, smaller kernel launches.
    cuda_graph: on CUDA with skin > 0, capture the evaluation as a CUDA graph and replay it at
            every call (`e2former_calc.cuda_graph`): for small systems, whose steps are bound by
            kernel launches. The graph keeps every pair within cutoff + skin of the last search
            (more edges, each beyond the cutoff contributing zero), padded with far self-images
            to a fixed edge count in periodic systems, so that searches refill it instead of
            forcing a new capture; results equal the default's up to rounding.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model="e2former-v2-water-s",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        mode: str = "conservative",
        spatial_sort: bool = True,
        skin: float = 0.0,
        recompute: bool = False,
        chunk_atoms: int | None = None,
        cuda_graph: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.mode = mode
        self.spatial_sort = spatial_sort
        if isinstance(model, torch.nn.Module):
            self.model = model.to(device=self.device, dtype=self.dtype).eval()
        else:
            self.model = load_model(model, self.device, self.dtype)
            self.model.requires_grad_(False)  # our own copy: no parameter gradients needed
        self.model.recompute_blocks = recompute
        if chunk_atoms is not None:
            if isinstance(chunk_atoms, bool) or not isinstance(chunk_atoms, int) or chunk_atoms < 1:
                raise ValueError(f"chunk_atoms must be a positive integer (target atoms per chunk), got {chunk_atoms!r}")
            self.model.chunk_atoms = chunk_atoms
        self.config = self.model.config
        self.graph_builder = VerletGraphBuilder(self.config.cutoff, skin, self.dtype, self.device, spatial_sort)
        self.captured = None
        self._warned_precision = False
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs a CUDA device; this calculator runs on {self.device}")
            if not skin > 0:
                raise ValueError("cuda_graph=True needs skin > 0: a graph is captured per neighbour search and replayed until the next")
            self.captured = CapturedModel(self.model)

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's changes (positions, numbers, cell, pbc, ...) plus charge/spin in atoms.info."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and any(
            not np.array_equal(self.atoms.info.get(key), atoms.info.get(key)) for key in INFO_KEYS
        ):
            changes.append("info")
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Fill self.results with every property this system and mode allow, in one evaluation."""
        super().calculate(atoms, properties, system_changes)
        stress_possible = self.mode == "conservative" and bool(self.atoms.pbc.all())
        if "stress" in properties:
            self._check_stress_possible(self.atoms)
        self._check_inputs(self.atoms)
        if self.captured is not None:
            graph, order, _ = self.graph_builder.static_graph(self.atoms)
        else:
            graph, order = self.graph_builder(self.atoms)
        evaluate = self.captured if self.captured is not None else self.model
        (self.results,) = self._run_model(
            graph, [order], compute_forces=True, compute_stress=stress_possible, evaluate=evaluate
        )

    def calculate_batch(
        self, atoms_list: Sequence[Atoms], properties: Sequence[str] = ("energy", "forces")
    ) -> list[dict]:
        """Evaluate many systems in one forward pass; one results dict per Atoms, in order.

        Each dict has the keys of `properties` (plus energy, free_energy, energies), with the same
        values and units as `atoms.calc.results` of a single calculation. Does not touch
        self.results or the Atoms' calculators.
        """
        unknown = set(properties) - set(self.implemented_properties)
        if unknown:
            raise PropertyNotImplementedError(f"unknown properties {sorted(unknown)}; available: {self.implemented_properties}")
        if "stress" in properties:
            for atoms in atoms_list:
                self._check_stress_possible(atoms)
        if len(atoms_list) == 0:
            return []
        for atoms in atoms_list:
            self._check_inputs(atoms)
        orders = [spatial_order(atoms) if self.spatial_sort else np.arange(len(atoms)) for atoms in atoms_list]
        graph = build_graph(atoms_list, self.config.cutoff, self.dtype, self.device, atom_order=orders)
        return self._run_model(graph, orders, compute_forces="forces" in properties,
                               compute_stress="stress" in properties, evaluate=self.model)

    def _run_model(
        self, graph: AtomicGraph, orders: Sequence[np.ndarray], compute_forces: bool, compute_stress: bool, evaluate
    ) -> list[dict]:
        """Results dicts of the systems packed in `graph` (system b's atom k is atoms[orders[b][k]]),
        evaluated by `evaluate` (the model, or its CapturedModel)."""
        precision = None if self._warned_precision else reduced_matmul_precision(self.device, self.dtype)
        if precision is not None:
            self._warned_precision = True
            warnings.warn(
                f"float32 matrix products run in {precision} (torch.backends.cuda.matmul.fp32_precision): the "
                "network's linears lose precision, which moves the shipped water model's forces by ~3 meV/Å on average "
                "(BENCHMARKS.md) and leaves them not exactly conservative; set "
                "torch.backends.cuda.matmul.fp32_precision = 'ieee' for exact MD", stacklevel=3)
        needs_autograd = self.mode == "conservative" and (compute_forces or compute_stress)
        with torch.set_grad_enabled(needs_autograd):
            output = evaluate(graph, compute_forces=compute_forces, compute_stress=compute_stress, mode=self.mode)
        output = _to_numpy(output)

        results, start = [], 0
        for system, order in enumerate(orders):
            in_graph = slice(start, start + len(order))
            start += len(order)
            energy = float(output["energy"][system])
            result = {
                "energy": energy,
                "free_energy": energy,
                "energies": _unpermute(output["energies"][in_graph], order),
            }
            if "forces" in output:
                result["forces"] = _unpermute(output["forces"][in_graph], order)
            if "stress" in output:
                result["stress"] = full_3x3_to_voigt_6_stress(output["stress"][system])
            results.append(result)
        return results

    def _check_inputs(self, atoms: Atoms) -> None:
        """Raise ValueError naming the problem for Atoms this model cannot evaluate."""
        validate_atoms(atoms)
        known = set(self.config.species)
        unknown = sorted(set(atoms.numbers.tolist()) - known)
        if unknown:
            names = ", ".join(f"{_symbol(z)} (Z={z})" for z in unknown)
            supported = ", ".join(_symbol(z) for z in sorted(known))
            raise ValueError(f"this model does not know the element(s) {names}; it supports {supported}")
        charge, spin = read_charge_spin(atoms)
        config = self.config
        if not config.use_charge_spin:
            if (charge, spin) != (0, 1):
                raise ValueError(
                    f"this model was trained without total charge and spin, but atoms.info sets "
                    f"charge={charge}, spin={spin}; remove atoms.info['charge'] and ['spin'] "
                    "(the model treats every system alike) or use a charge/spin-aware model"
                )
            return
        if abs(charge) > config.max_charge:
            raise ValueError(f"atoms.info['charge']={charge} is outside the model's range ±{config.max_charge}")
        if not 1 <= spin <= config.max_spin:
            raise ValueError(f"atoms.info['spin']={spin} (multiplicity 2S+1) is outside the model's range 1..{config.max_spin}")
        electrons = int(atoms.numbers.sum()) - charge
        if (electrons + spin - 1) % 2:
            raise ValueError(
                f"charge {charge} and spin multiplicity {spin} are inconsistent: {electrons} electrons "
                f"need an {'even' if electrons % 2 else 'odd'} multiplicity (set atoms.info['spin'])"
            )

    def _check_stress_possible(self, atoms: Atoms) -> None:
        if self.mode == "direct":
            raise PropertyNotImplementedError(
                "stress needs mode='conservative': the direct force head gives no strain derivative"
            )
        if not atoms.pbc.all():
            raise PropertyNotImplementedError(
                f"stress needs a cell periodic in all three directions; this one has pbc={atoms.pbc.tolist()}"
            )


def _to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The model's outputs as float64 numpy arrays, moved to the host in one copy."""
    flat = torch.cat([value.detach().reshape(-1) for value in tensors.values()])
    flat = flat.to("cpu", torch.float64).numpy()
    arrays, start = {}, 0
    for name, value in tensors.items():
        arrays[name] = flat[start : start + value.numel()].reshape(value.shape)
        start += value.numel()
    return arrays


def _unpermute(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per-atom `values` in graph order -> Atoms order (graph atom k is Atoms atom order[k])."""
    restored = np.empty_like(values)
    restored[order] = values
    return restored


def _symbol(atomic_number: int) -> str:
    return chemical_symbols[atomic_number] if 0 < atomic_number < len(chemical_symbols) else f"Z{atomic_number}"
