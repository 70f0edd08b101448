"""Inference throughput and peak GPU memory from 1k to 1M atoms, E2Former-V2 beside its peers (issue 7).

Protocol (paper Table 3 / appendix D): FCC carbon (lattice constant 3.8 Å); the N atoms of a
cubic supercell nearest its centre (a near-spherical block, so the neighbour count is bulk-like
inside; ties broken by a seeded jitter, so the block is deterministic), in Morton order as the
calculator uses; cutoff 6 Å (~50 neighbours), no periodic boundaries, float32, random weights.
N ∈ {1k, 10k, 50k, 100k, 300k, 1M}. For each N the neighbour list is built once, outside the
timed loop, and timed separately on the CPU (vesin, then copied to the GPU) and on the GPU
(vesin-torch). Each (model, force mode, N) then runs up to 10 warm-up and 10 timed steps (CUDA
events); one step is one energy + forces evaluation ("direct": the force head under no_grad,
"conservative": F = -dE/dr by autograd). Reported: steps/s, peak memory
(torch.cuda.max_memory_allocated, reset per case; it includes the resident graph and weights,
given separately as resident_gb) and bytes per atom (peak / N).

Never a crash: out-of-memory is recorded as "OOM" and the larger N of that model and mode are
skipped. Each model and mode has a time budget (BUDGETS_S); before a case the step time is
predicted from the previous N (linear in N) and the warm-up/timed counts are lowered along
STEP_LADDER to fit, down to 1 + 1; what still does not fit is "skipped (time)". The counts used
are in every row. A global deadline (--deadline-s) bounds the whole run.

Models:
  e2former_paper         paper size (L=2, C=256, 4 blocks, 128 heads), fused Triton attention
  e2former_water_small   the water preset's architecture (C=64, 3 blocks, 16 heads), cutoff 6 Å
  e2former_paper_naive   paper size with the PyTorch reference attention, which materialises the
                         per-edge keys, values and messages (E×H×D, E×H×C, E×3×H×C)
  e2former_*_recompute   conservative mode that keeps only each block's input for the force pass
                         and recomputes the block there (E2FormerCalculator(recompute=True))
  e2former_*_graph       the step captured once per N as one CUDA graph and replayed
                         (e2former_calc.cuda_graph.CapturedModel, as E2FormerCalculator(cuda_graph=True)
                         does in MD); CUDA only, and only up to GRAPH_MAX_ATOMS, where steps are
                         bound by kernel launches
  e2former_*_tf32        matrix products on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32 for the
                         step only; everything else FP32)
  e2former_*_compiled    each transformer block compiled by torch.compile around the attention kernel
                         (E2FormerV2.compile_blocks: the per-atom and per-edge elementwise chains fused;
                         compiled at the first step of each N); *_compiled_graph also as a CUDA graph
  (for *_tf32 and *_compiled, the forces of one step at each N are compared with the plain model's and
   recorded as force_deviation in the model's info)
  mace                   mace-torch 0.3.16 ScaleShiftMACE, e3nn backend: 128x0e+128x1o,
                         max_ell 3, correlation 3, 2 interactions, 6 Å; conservative only
  mace_cueq              the same MACE (same weights) converted to cuEquivariance 0.13 kernels by
                         mace's own run_e3nn_to_cueq, as MACECalculator(enable_cueq=True) does;
                         its forces are checked against the e3nn model's before timing
  esen_sm                fairchem-core eSCNMDBackbone with UMA-S's backbone (K4L2: 128 sphere
                         channels, lmax = mmax = 2, 4 layers, 64 Gaussians, 6 Å) and no experts:
                         eSEN-sm, and UMA-S's per-structure compute once its experts are merged
  equiformer_v2          fairchem-core 1.10 EquiformerV2 with its 31M OC20 hyper-parameters (8 layers, 128
                         sphere channels, lmax 4, mmax 2, 8 heads, grid 18), 6 Å; direct forces only
MACE (it pins e3nn 0.4.4, which our tests cannot use) and fairchem run in subprocesses of this
script (--peer), with their wheels' install folders put first on PYTHONPATH, before this process
touches the GPU, so each has the whole device. EquiformerV2 left fairchem-core in 2.0, so it runs
from a 1.10 install (--equiformer-site, its wheel installed without its pins on torch and numpy)
with benchmarks/peer_shims first on the path (a torch_scatter stand-in, see there).

    python -m benchmarks.bench_throughput --out throughput.json            # GPU, ~8 minutes
    python -m benchmarks.bench_throughput --smoke --no-peers               # CPU check, tiny N
    python -m benchmarks.plot_throughput throughput.json                   # the figure
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk

from benchmarks.common import environment, time_cuda
from e2former_calc.models.graph import AtomicGraph
from e2former_calc.neighbors import TorchNeighborList, build_graph, spatial_order

ROOT = Path(__file__).resolve().parent.parent
LATTICE_CONSTANT = 3.8  # Å, FCC carbon as in the paper
CUTOFF = 6.0  # Å
SIZES = (1_000, 10_000, 50_000, 100_000, 300_000, 1_000_000)
SMOKE_SIZES = (64, 256)
# (warm-up, timed) step counts, tried in order until the predicted case time fits its allowance.
STEP_LADDER = ((10, 10), (5, 5), (3, 3), (2, 2), (1, 2), (1, 1))
MODES = ("direct", "conservative")
# Seconds of warm-up + timed steps (OOM attempts included) each model and mode may spend over all N.
BUDGETS_S = {
    ("e2former_paper", "direct"): 45,
    ("e2former_paper", "conservative"): 45,
    ("e2former_water_small", "direct"): 40,
    ("e2former_water_small", "conservative"): 40,
    ("e2former_paper_naive", "direct"): 15,
    ("e2former_paper_naive", "conservative"): 15,
    ("e2former_paper_recompute", "conservative"): 45,
    ("e2former_water_small_recompute", "conservative"): 40,
    ("e2former_paper_graph", "direct"): 15,
    ("e2former_paper_graph", "conservative"): 15,
    ("e2former_water_small_graph", "direct"): 15,
    ("e2former_water_small_graph", "conservative"): 15,
    ("e2former_paper_tf32", "direct"): 30,
    ("e2former_paper_tf32", "conservative"): 30,
    ("e2former_water_small_tf32", "direct"): 30,
    ("e2former_water_small_tf32", "conservative"): 30,
    ("e2former_paper_compiled", "direct"): 60,
    ("e2former_paper_compiled", "conservative"): 60,
    ("e2former_water_small_compiled", "direct"): 60,
    ("e2former_water_small_compiled", "conservative"): 60,
    ("e2former_paper_compiled_graph", "direct"): 30,
    ("e2former_paper_compiled_graph", "conservative"): 30,
    ("e2former_water_small_compiled_graph", "direct"): 30,
    ("e2former_water_small_compiled_graph", "conservative"): 30,
    ("mace", "conservative"): 50,
    ("mace_cueq", "conservative"): 40,
    ("esen_sm", "direct"): 30,
    ("esen_sm", "conservative"): 30,
    ("equiformer_v2", "direct"): 30,
}
OUR_MODELS = ("e2former_paper", "e2former_water_small", "e2former_paper_naive", "e2former_paper_recompute",
              "e2former_water_small_recompute", "e2former_paper_graph", "e2former_water_small_graph",
              "e2former_paper_tf32", "e2former_water_small_tf32", "e2former_paper_compiled",
              "e2former_water_small_compiled", "e2former_paper_compiled_graph", "e2former_water_small_compiled_graph")
GRAPH_MAX_ATOMS = 10_000  # above this a step is long enough that launches no longer matter
PEERS = ("mace", "mace_cueq", "esen_sm", "equiformer_v2")
PEER_SHIMS = Path(__file__).resolve().parent / "peer_shims"
PEER_STARTUP_S = 45  # imports, model build and neighbour lists of a peer subprocess, on top of its budgets
NOT_RUN = {
    **{(name, "direct"): "recomputation only changes the backward pass, which direct mode does not run"
       for name in ("e2former_paper_recompute", "e2former_water_small_recompute")},
    ("mace", "direct"): "MACE has no direct-force head (forces are -dE/dr only)",
    ("equiformer_v2", "conservative"): "EquiformerV2 predicts forces with its direct head (as trained and published)",
}


# ----------------------------------------------------------------------------- systems and graphs


def fcc_carbon(num_atoms: int, seed: int = 0) -> Atoms:
    """The `num_atoms` atoms of an FCC carbon crystal (a = 3.8 Å) nearest its centre, pbc off.

    The supercell is large enough to hold a ball of that many atoms, so the block is compact
    (minimum surface); distance ties are broken by a jitter of 1e-6 Å from `seed`. Atoms come
    in Morton order (`spatial_order`), as the calculator feeds them to the GPU kernels.
    """
    unit = bulk("C", "fcc", a=LATTICE_CONSTANT, cubic=True)
    repeat = int(np.ceil((num_atoms * 6 / np.pi / len(unit)) ** (1 / 3))) + 1
    crystal = unit * (repeat, repeat, repeat)
    rng = np.random.default_rng(seed)
    distance = np.linalg.norm(crystal.positions - crystal.positions.mean(axis=0), axis=1)
    nearest = np.argsort(distance + rng.uniform(0.0, 1e-6, len(crystal)), kind="stable")[:num_atoms]
    atoms = Atoms(numbers=np.full(num_atoms, 6), positions=crystal.positions[np.sort(nearest)], pbc=False)
    return atoms[spatial_order(atoms)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_graph(atoms: Atoms, device: torch.device, search_device: torch.device) -> tuple[AtomicGraph, float]:
    """The graph on `device` with its neighbour search on `search_device`, and the seconds it took.

    The time covers the search, sorting, CSR construction and the copy to `device`.
    """
    synchronize(device)
    start = time.perf_counter()
    graph = build_graph([atoms], CUTOFF, device=search_device).to(device)
    synchronize(device)
    return graph, time.perf_counter() - start


def neighbor_list_row(atoms: Atoms, device: torch.device) -> tuple[AtomicGraph, dict]:
    """Build the graph the models use, timing it on the CPU and (CUDA with vesin-torch) on the GPU."""
    cpu_graph, cpu_seconds = timed_graph(atoms, device, torch.device("cpu"))
    row = {"num_atoms": len(atoms), "num_edges": cpu_graph.num_edges,
           "mean_neighbors": cpu_graph.num_edges / len(atoms), "cpu_vesin_s": cpu_seconds}
    if device.type == "cuda" and TorchNeighborList is not None:
        del cpu_graph
        graph, row["gpu_vesin_torch_s"] = timed_graph(atoms, device, device)
        torch.cuda.empty_cache()
        return graph, row
    row["gpu_vesin_torch_s"] = None  # no GPU, or vesin-torch missing: the CPU graph serves
    return cpu_graph, row


def warm_up_neighbor_search(device: torch.device) -> None:
    """One small search first, so one-time CUDA setup is not charged to the first N."""
    if device.type == "cuda":
        build_graph([fcc_carbon(64)], CUTOFF, device=device)


# ----------------------------------------------------------------------------- models


@dataclass
class Contender:
    """One model in one force mode.

    make_step(graph) returns a function doing one step (energy and forces) on that graph; the
    step's inputs are built there, once per N, outside the timed loop.
    """

    model: str
    mode: str
    make_step: Callable[[AtomicGraph], Callable[[], object]]
    budget_s: float
    max_atoms: int | None = None  # larger N are "skipped (size)"


@contextlib.contextmanager
def attention_replaced(make_replacement):
    """Inside the block E2FormerV2 calls make_replacement(attention) in place of its neighbour attention."""
    from e2former_calc.models import e2former

    attention = e2former.neighbor_attention
    e2former.neighbor_attention = make_replacement(attention)
    try:
        yield
    finally:
        e2former.neighbor_attention = attention


def reference_attention():
    """Run E2FormerV2's attention through the PyTorch reference (use_kernel=False) inside the block.

    The model passes use_kernel=None (Triton on CUDA) except when create_graph is set; a
    benchmark cannot use create_graph (it would keep the double-backward graph), so the op the
    model module calls is swapped for one that forces the reference.
    """
    def forcing_reference(attention):
        return lambda *args, **kwargs: attention(*args, **{**kwargs, "use_kernel": False})

    return attention_replaced(forcing_reference)


@contextlib.contextmanager
def tf32_matmuls():
    """Let float32 matrix products use TF32 tensor cores (10-bit mantissa) inside the block."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def e2former_configs() -> dict:
    """Architecture of each of our models: the paper size, and the water preset at a 6 Å cutoff with C."""
    from e2former_calc.models.e2former import E2FormerConfig

    water = {**E2FormerConfig.water_small().to_dict(), "species": [1, 6, 8], "cutoff": CUTOFF}
    return {
        "e2former_paper": E2FormerConfig(cutoff=CUTOFF),
        "e2former_water_small": E2FormerConfig.from_dict(water),
        "e2former_paper_naive": E2FormerConfig(cutoff=CUTOFF),
        "e2former_paper_recompute": E2FormerConfig(cutoff=CUTOFF),
        "e2former_water_small_recompute": E2FormerConfig.from_dict(water),
        "e2former_paper_graph": E2FormerConfig(cutoff=CUTOFF),
        "e2former_water_small_graph": E2FormerConfig.from_dict(water),
        "e2former_paper_tf32": E2FormerConfig(cutoff=CUTOFF),
        "e2former_water_small_tf32": E2FormerConfig.from_dict(water),
        "e2former_water_small_compiled": E2FormerConfig.from_dict(water),
        "e2former_water_small_compiled_graph": E2FormerConfig.from_dict(water),
        "e2former_paper_compiled": E2FormerConfig(cutoff=CUTOFF),
        "e2former_paper_compiled_graph": E2FormerConfig(cutoff=CUTOFF),
    }


def e2former_contenders(names, modes, device, budget_scale, chunk_atoms=None) -> tuple[list[Contender], dict]:
    """Contenders for our models (random weights, seed 0) and a description of each model; `chunk_atoms`
    (default: the model's) sets the chunk size of chunked evaluation (no autograd, or recomputation)."""
    from e2former_calc.cuda_graph import CapturedModel
    from e2former_calc.models.e2former import E2FormerV2

    contenders, info = [], {}
    for name, config in e2former_configs().items():
        if name not in names:
            continue
        graphed, naive, tf32 = name.endswith("_graph"), name.endswith("_naive"), name.endswith("_tf32")
        compiled = "_compiled" in name
        if graphed and device.type != "cuda":
            info[name] = {"not_run": "CUDA graphs need a CUDA device"}
            continue
        torch.manual_seed(0)
        model = E2FormerV2(config).to(device).eval()
        model.recompute_blocks = name.endswith("_recompute")
        model.chunk_atoms = model.chunk_atoms if chunk_atoms is None else chunk_atoms
        info[name] = {"parameters": sum(p.numel() for p in model.parameters()), "config": config.to_dict(),
                      "chunk_atoms": model.chunk_atoms,
                      "attention": "PyTorch reference" if naive else "fused Triton kernel on CUDA"}
        evaluated = copy.deepcopy(model).compile_blocks() if compiled else model
        if tf32 or compiled:
            info[name]["force_deviation"] = {}
        for mode in modes:
            if (name, mode) in NOT_RUN:
                continue
            def make_step(graph, model=model, evaluated=evaluated, mode=mode, naive=naive, graphed=graphed, name=name,
                          tf32=tf32, compared=tf32 or compiled):
                evaluate = CapturedModel(evaluated) if graphed else evaluated  # captured at the first (warm-up) step
                def step():
                    context = reference_attention() if naive else tf32_matmuls() if tf32 else contextlib.nullcontext()
                    grad = torch.no_grad() if mode == "direct" else contextlib.nullcontext()
                    with context, grad:
                        return evaluate(graph, compute_forces=True, mode=mode)["forces"]
                if compared:
                    info[name]["force_deviation"][f"{mode}/{graph.num_atoms}"] = force_deviation(step, model, graph, mode)
                return step
            contenders.append(Contender(name, mode, make_step, budget_scale * BUDGETS_S[(name, mode)],
                                        GRAPH_MAX_ATOMS if graphed else None))
    return contenders, info


def force_deviation(step, model, graph: AtomicGraph, mode: str) -> dict:
    """Largest and mean |F_step - F_model| (eV/Å) of one step against the plain model, and the largest |F|."""
    grad = torch.no_grad() if mode == "direct" else contextlib.nullcontext()
    with grad:
        reference = model(graph, compute_forces=True, mode=mode)["forces"].detach()
    difference = (step().detach() - reference).abs()
    return {"max_abs_eV_per_A": difference.max().item(), "mean_abs_eV_per_A": difference.mean().item(),
            "max_force_eV_per_A": reference.abs().max().item()}


def mace_batch(graph: AtomicGraph, device: torch.device) -> dict:
    """MACE's input dictionary for one carbon structure without periodic images."""
    num_atoms, num_edges = graph.num_atoms, graph.num_edges
    return {
        "positions": graph.positions.clone(),
        "node_attrs": torch.ones(num_atoms, 1, device=device),
        "edge_index": torch.stack([graph.source_index, graph.target_index]),  # sender, receiver
        "shifts": torch.zeros(num_edges, 3, device=device),
        "unit_shifts": torch.zeros(num_edges, 3, device=device),
        "cell": torch.zeros(3, 3, device=device),
        "batch": torch.zeros(num_atoms, dtype=torch.long, device=device),
        "ptr": torch.tensor([0, num_atoms], device=device),
    }


def mace_contenders(device, budget_scale, first_graph: AtomicGraph, cueq: bool) -> tuple[list[Contender], dict]:
    """ScaleShiftMACE with mace_run_train's defaults for the parts the issue leaves open.

    Issue 7's model: hidden irreps 128x0e+128x1o, max_ell (spherical harmonics) 3, correlation 3,
    2 interactions, r_max 6 Å, carbon only. Defaults of mace_run_train --model=MACE: 8 Bessel
    functions, polynomial cutoff p = 5, RealAgnosticResidualInteractionBlock, MLP_irreps 16x0e,
    radial MLP [64, 64, 64], SiLU gates. Float32. avg_num_neighbors comes from `first_graph`.

    With `cueq` the e3nn model is converted by mace's run_e3nn_to_cueq (what MACECalculator does
    with enable_cueq=True: same weights, ir_mul layout, all cuEquivariance kernels, fused
    convolution on CUDA) and its forces on `first_graph` are compared with the e3nn model's.
    """
    import mace
    from e3nn import __version__ as e3nn_version
    from e3nn import o3
    from mace import modules

    mean_neighbors = first_graph.num_edges / first_graph.num_atoms
    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    hyper = {"hidden_irreps": "128x0e+128x1o", "max_ell": 3, "correlation": 3, "num_interactions": 2,
             "r_max": CUTOFF, "num_bessel": 8, "num_polynomial_cutoff": 5, "MLP_irreps": "16x0e",
             "radial_MLP": [64, 64, 64], "interaction": "RealAgnosticResidualInteractionBlock",
             "avg_num_neighbors": mean_neighbors}
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=CUTOFF, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=interaction, interaction_cls_first=interaction, num_interactions=2,
        num_elements=1, hidden_irreps=o3.Irreps(hyper["hidden_irreps"]), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(1), avg_num_neighbors=mean_neighbors, atomic_numbers=[6],
        correlation=3, gate=modules.gate_dict["silu"], radial_MLP=[64, 64, 64],
        atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    ).to(device).eval()
    info = {"parameters": sum(p.numel() for p in model.parameters()), "hyperparameters": hyper,
            "mace-torch": mace.__version__, "e3nn": e3nn_version, "backend": "e3nn (no cuEquivariance)"}
    name = "mace"
    if cueq:
        import cuequivariance
        from mace.cli.convert_e3nn_cueq import run as e3nn_to_cueq

        name = "mace_cueq"
        if device.type == "cuda":  # the CUDA kernels; without them cuequivariance_torch falls back to PyTorch
            import cuequivariance_ops_torch  # noqa: F401
        e3nn_forces = model(mace_batch(first_graph, device), training=False, compute_force=True)["forces"].detach()
        model = e3nn_to_cueq(model, device=device.type).eval()
        cueq_forces = model(mace_batch(first_graph, device), training=False, compute_force=True)["forces"].detach()
        deviation = (cueq_forces - e3nn_forces).abs().max().item()
        largest = e3nn_forces.abs().max().item()
        info.update(backend=f"cuEquivariance {cuequivariance.__version__} (mace run_e3nn_to_cueq)",
                    check=f"forces on {first_graph.num_atoms} atoms vs the e3nn model with the same weights: "
                          f"max |dF| {deviation:.2e} eV/Å, max |F| {largest:.2e} eV/Å")
        print(f"mace_cueq: {info['check']}", flush=True)

    def make_step(graph):
        data = mace_batch(graph, device)
        return lambda: model(data, training=False, compute_force=True)["forces"]

    return [Contender(name, "conservative", make_step, budget_scale * BUDGETS_S[(name, "conservative")])], {name: info}


def esen_contenders(modes, device, budget_scale) -> tuple[list[Contender], dict]:
    """fairchem's eSCN-MD backbone with UMA-S's K4L2 hyper-parameters and no experts (eSEN-sm).

    Direct: backbone with direct forces, MLP energy head and linear (l=1) force head.
    Conservative: MLP_EFS_Head, forces by autograd. Random weights, float32, graph given (no
    on-the-fly graph). fairchem.core imports wandb for its trainer's logger; where wandb is not
    installed a placeholder module stands in (nothing is logged here).
    """
    try:
        import wandb  # noqa: F401
    except ImportError:
        placeholder = types.ModuleType("wandb")
        placeholder.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = placeholder
    from importlib.metadata import version

    from fairchem.core.datasets.atomic_data import AtomicData
    from fairchem.core.models.base import HydraModel

    backbone = {
        "model": "fairchem.core.models.uma.escn_md.eSCNMDBackbone", "max_num_elements": 100,
        "sphere_channels": 128, "lmax": 2, "mmax": 2, "otf_graph": False, "cutoff": CUTOFF,
        "edge_channels": 128, "distance_function": "gaussian", "num_distance_basis": 64,
        "num_layers": 4, "hidden_channels": 128, "norm_type": "rms_norm_sh", "act_type": "gate",
        "ff_type": "spectral", "regress_forces": True, "always_use_pbc": False, "use_dataset_embedding": False,
    }
    heads = {
        "direct": {"energy": {"module": "fairchem.core.models.uma.escn_md.MLP_Energy_Head"},
                   "forces": {"module": "fairchem.core.models.uma.escn_md.Linear_Force_Head"}},
        "conservative": {"efs": {"module": "fairchem.core.models.uma.escn_md.MLP_EFS_Head", "wrap_property": False}},
    }
    contenders, info = [], {"esen_sm": {"fairchem-core": version("fairchem-core"), "backbone": backbone, "parameters": {}}}
    for mode in modes:
        torch.manual_seed(0)
        model = HydraModel(backbone={**backbone, "direct_forces": mode == "direct"}, heads=heads[mode],
                           otf_graph=False).to(device).eval()
        info["esen_sm"]["parameters"][mode] = sum(p.numel() for p in model.parameters())

        def make_step(graph, model=model, mode=mode):
            n, e = graph.num_atoms, graph.num_edges
            zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
            data = AtomicData(
                pos=graph.positions.clone(), atomic_numbers=torch.full((n,), 6, device=device),
                cell=zeros(1, 3, 3, dtype=torch.float32), pbc=zeros(1, 3, dtype=torch.bool),
                natoms=torch.tensor([n], device=device),
                edge_index=torch.stack([graph.source_index, graph.target_index]),  # source, target
                cell_offsets=zeros(e, 3, dtype=torch.float32), nedges=torch.tensor([e], device=device),
                charge=zeros(1), spin=zeros(1), fixed=zeros(n), tags=zeros(n), batch=zeros(n),
            )

            def step():
                with torch.no_grad() if mode == "direct" else contextlib.nullcontext():
                    out = model(data)
                return out["forces"]["forces"] if mode == "direct" else out["efs"]["forces"]
            return step

        contenders.append(Contender("esen_sm", mode, make_step, budget_scale * BUDGETS_S[("esen_sm", mode)]))
    return contenders, info


def equiformer_contenders(device, budget_scale) -> tuple[list[Contender], dict]:
    """fairchem-core 1.x EquiformerV2 with the hyper-parameters of its 31M OC20 model, direct forces.

    Random weights, float32, eval mode (no dropout), our graph given (otf_graph off, no periodic
    images), its cutoff set to ours. Inputs are a torch_geometric Batch, as fairchem 1.x expects.
    """
    from importlib.metadata import version

    from fairchem.core.models.base import HydraModel
    from torch_geometric.data import Batch, Data

    module = "fairchem.core.models.equiformer_v2"
    backbone = {
        "model": f"{module}.equiformer_v2.EquiformerV2Backbone", "use_pbc": False, "otf_graph": False,
        "regress_forces": True, "max_radius": CUTOFF, "max_neighbors": 500, "max_num_elements": 90,
        "num_layers": 8, "sphere_channels": 128, "attn_hidden_channels": 64, "num_heads": 8,
        "attn_alpha_channels": 64, "attn_value_channels": 16, "ffn_hidden_channels": 128,
        "norm_type": "layer_norm_sh", "lmax_list": [4], "mmax_list": [2], "grid_resolution": 18,
        "num_sphere_samples": 128, "edge_channels": 128, "use_atom_edge_embedding": True,
        "distance_function": "gaussian", "num_distance_basis": 512, "attn_activation": "silu",
        "use_s2_act_attn": False, "ffn_activation": "silu", "use_gate_act": False, "use_grid_mlp": True,
        "alpha_drop": 0.0, "drop_path_rate": 0.0, "proj_drop": 0.0, "weight_init": "uniform",
    }
    heads = {"energy": {"module": f"{module}.heads.EqV2ScalarHead"},
             "forces": {"module": f"{module}.heads.EqV2VectorHead"}}
    torch.manual_seed(0)
    model = HydraModel(backbone=backbone, heads=heads, otf_graph=False).to(device).eval()
    # Its backbone's forward re-enables grad (fairchem's conditional_grad, as it has no direct_forces flag), so
    # with trainable weights it would record the whole autograd graph (~1.9 MB per edge) even under no_grad.
    model.requires_grad_(False)
    info = {"equiformer_v2": {"fairchem-core": version("fairchem-core"), "backbone": backbone,
                              "parameters": {"direct": sum(p.numel() for p in model.parameters())}}}

    def make_step(graph):
        n, e = graph.num_atoms, graph.num_edges
        batch = Batch.from_data_list([Data(
            pos=graph.positions.clone(), atomic_numbers=torch.full((n,), 6, device=device),
            natoms=torch.tensor([n], device=device),
            edge_index=torch.stack([graph.source_index, graph.target_index]),  # source, target
            cell=torch.zeros(1, 3, 3, device=device), cell_offsets=torch.zeros(e, 3, device=device),
            neighbors=torch.tensor([e], device=device),
        )])

        def step():
            with torch.no_grad():
                return model(batch)["forces"]["forces"]
        return step

    budget = budget_scale * BUDGETS_S[("equiformer_v2", "direct")]
    return [Contender("equiformer_v2", "direct", make_step, budget)], info


# ----------------------------------------------------------------------------- measuring


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def choose_steps(predicted_step_s, allowance_s, remaining_s, ladder):
    """(warm-up, timed) counts whose predicted time fits the allowance, else the smallest that fits
    what is left, else None. Without a prediction (first N), the full counts."""
    if predicted_step_s is None:
        return ladder[0]
    for warmup, repeats in ladder:
        if predicted_step_s * (warmup + repeats) <= allowance_s:
            return warmup, repeats
    warmup, repeats = ladder[-1]
    return (warmup, repeats) if predicted_step_s * (warmup + repeats) <= remaining_s else None


class Sweep:
    """Runs contenders over increasing N within their budgets and the global deadline.

    The time left to a contender is shared among the sizes still to come in proportion to N
    (its cost), leaving out sizes whose peak memory, extrapolated linearly from the last success,
    exceeds the GPU's. `record(row)` is called with every row as soon as it exists.
    """

    def __init__(self, contenders, sizes, device, deadline, ladder, record):
        self.contenders, self.sizes, self.device = contenders, list(sizes), device
        self.deadline, self.ladder, self.record = deadline, ladder, record
        self.spent = {self.key(c): 0.0 for c in contenders}
        self.last = {self.key(c): None for c in contenders}  # (N, s/step, peak bytes) of the last success
        self.memory_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        self.stopped = {self.key(c): None for c in contenders}  # why larger N are skipped

    @staticmethod
    def key(contender):
        return contender.model, contender.mode

    def run_size(self, graph: AtomicGraph) -> None:
        for contender in self.contenders:
            self.record(self.run_case(contender, graph))

    def run_case(self, contender: Contender, graph: AtomicGraph) -> dict:
        key, n = self.key(contender), graph.num_atoms
        row = {"model": contender.model, "mode": contender.mode, "num_atoms": n, "num_edges": graph.num_edges}
        if self.stopped[key]:
            return {**row, "status": self.stopped[key]}
        if contender.max_atoms is not None and n > contender.max_atoms:
            return {**row, "status": "skipped (size)"}
        remaining = min(contender.budget_s - self.spent[key], self.deadline - time.monotonic())
        predicted, larger = None, [size for size in self.sizes if size > n]
        if self.last[key] is not None:
            last_n, last_step_s, last_peak = self.last[key]
            predicted = last_step_s * n / last_n
            if last_peak and self.memory_bytes:  # reserve no time for sizes that will not fit in memory
                larger = [size for size in larger if last_peak * size / last_n < self.memory_bytes]
        allowance = remaining * n / (n + sum(larger))
        steps = choose_steps(predicted, allowance, remaining, self.ladder)
        if steps is None or remaining <= 0:
            self.stopped[key] = "skipped (time)"
            return {**row, "status": "skipped (time)", "predicted_s_per_step": predicted}
        warmup, repeats = steps
        row.update(warmup=warmup, repeats=repeats)
        status, seconds = self.measure(contender, graph, warmup, repeats, row)
        self.spent[key] += row["case_wall_s"]
        row["status"] = status
        if status == "ok":
            self.last[key] = (n, seconds, row.get("peak_gb", 0.0) * 1e9)
            row.update(seconds_per_step=seconds, steps_per_s=1.0 / seconds)
        else:
            self.stopped[key] = f"skipped (after {status.split(':')[0]} at N={n})"
        return row

    def measure(self, contender, graph, warmup, repeats, row) -> tuple[str, float | None]:
        """Time one case; fills the memory and wall-time fields of `row`. Returns (status, s/step)."""
        cuda = self.device.type == "cuda"
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            row["resident_gb"] = torch.cuda.memory_allocated(self.device) / 1e9
        start = time.perf_counter()
        status, seconds = "ok", None
        try:
            seconds = time_cuda(contender.make_step(graph), warmup, repeats)
        except Exception as error:  # recorded, never raised: the sweep goes on
            status = "OOM" if is_out_of_memory(error) else f"error: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        row["case_wall_s"] = time.perf_counter() - start
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            row.update(peak_gb=peak / 1e9, peak_reserved_gb=torch.cuda.max_memory_reserved(self.device) / 1e9,
                       bytes_per_atom=peak / graph.num_atoms)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return status, seconds


# ----------------------------------------------------------------------------- output


class Results:
    """The JSON document, rewritten after every change so that a killed run keeps what it measured."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str))
        temporary.replace(self.path)

    def add_row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()
        print_row(row)


def format_rate(row: dict) -> str:
    return f"{row['steps_per_s']:.3g}" if row.get("status") == "ok" else row.get("status", "")


def print_row(row: dict) -> None:
    steps = f"{row['warmup']}+{row['repeats']}" if "warmup" in row else ""
    peak = f"{row['peak_gb']:.2f}" if row.get("peak_gb") is not None else "-"
    per_atom = f"{row['bytes_per_atom'] / 1e3:.0f}k" if row.get("bytes_per_atom") is not None else "-"
    print(f"{row['model']:30s} {row['mode']:12s} {row['num_atoms']:>8} {row.get('num_edges', ''):>10} "
          f"{steps:>6s} {format_rate(row):>12.40s} {peak:>7s} {per_atom:>8s}", flush=True)


def print_summary(data: dict) -> None:
    print("\nneighbour lists (s): N, edges, CPU vesin (+ copy to GPU), GPU vesin-torch")
    for row in data["neighbor_lists"]:
        gpu = f"{row['gpu_vesin_torch_s']:.3f}" if row.get("gpu_vesin_torch_s") is not None else "n/a"
        print(f"  {row['num_atoms']:>8} {row['num_edges']:>10} {row['cpu_vesin_s']:8.3f} {gpu:>8s}")
    print("\nsteps/s (peak GB) by N")
    sizes = sorted({row["num_atoms"] for row in data["rows"]})
    print(f"{'model':30s} {'mode':12s} " + " ".join(f"{n:>16}" for n in sizes))
    for key in dict.fromkeys((row["model"], row["mode"]) for row in data["rows"]):
        cells = []
        for n in sizes:
            row = next((r for r in data["rows"] if (r["model"], r["mode"], r["num_atoms"]) == (*key, n)), None)
            if row is None:
                cells.append("")
            elif row.get("status") == "ok" and row.get("peak_gb") is not None:
                cells.append(f"{row['steps_per_s']:.3g} ({row['peak_gb']:.1f})")
            else:
                cells.append(format_rate(row)[:16])
        print(f"{key[0]:30s} {key[1]:12s} " + " ".join(f"{c:>16s}" for c in cells))
    for entry in data["not_run"]:
        print(f"not run: {entry['model']} {entry['mode']}: {entry['reason']}")


# ----------------------------------------------------------------------------- peers (subprocesses)


def peer_main(args) -> None:
    """Inside a peer subprocess: build the peer's contenders and sweep them; rows go to args.out."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = Results(Path(args.out), {"rows": [], "models": {}, "neighbor_lists": []})
    deadline = time.monotonic() + args.deadline_s
    try:
        warm_up_neighbor_search(device)
        graphs = {}
        if args.peer in ("mace", "mace_cueq"):
            graphs[args.sizes[0]] = build_graph([fcc_carbon(args.sizes[0])], CUTOFF, device=device)
            contenders, info = mace_contenders(device, args.budget_scale, graphs[args.sizes[0]],
                                               cueq=args.peer == "mace_cueq")
        elif args.peer == "esen_sm":
            contenders, info = esen_contenders(args.modes, device, args.budget_scale)
        else:
            contenders, info = equiformer_contenders(device, args.budget_scale)
        results.data["models"] = info
        results.save()
    except Exception as error:  # the parent records why this peer did not run
        results.data["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        results.save()
        raise
    sweep = Sweep(contenders, args.sizes, device, deadline, ladder_from(args), results.add_row)
    for n in args.sizes:
        if all(sweep.stopped.values()):
            break
        graph = graphs.pop(n, None)
        if graph is None:
            graph = build_graph([fcc_carbon(n)], CUTOFF, device=device)
        sweep.run_size(graph)
        del graph
    # Sizes never reached (every contender stopped) still get a row each.
    done = {(r["model"], r["mode"], r["num_atoms"]) for r in results.data["rows"]}
    for n in args.sizes:
        for contender in contenders:
            if (contender.model, contender.mode, n) not in done:
                results.add_row({"model": contender.model, "mode": contender.mode, "num_atoms": n,
                                 "status": sweep.stopped[Sweep.key(contender)] or "skipped (time)"})


def run_peer(peer: str, args, sites: tuple[str, ...], modes, timeout_s: float) -> tuple[list[dict], dict, str | None]:
    """Run one peer in a subprocess with `sites` (install folders) first on its path.

    Returns its rows, model info, and why it did not run (or None).
    """
    missing = [site for site in sites if not Path(site).is_dir()]
    if missing:
        return [], {}, f"its wheels are not installed at {', '.join(missing)}"
    if timeout_s <= PEER_STARTUP_S / 2:
        return [], {}, "skipped (time)"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{peer}.json"
        command = [sys.executable, "-m", "benchmarks.bench_throughput", "--peer", peer, "--out", str(out),
                   "--sizes", *map(str, args.sizes), "--modes", *modes, "--budget-scale", str(args.budget_scale),
                   "--deadline-s", str(timeout_s - 5), "--max-warmup", str(args.max_warmup),
                   "--max-repeats", str(args.max_repeats)]
        shims = str(PEER_SHIMS) if peer == "equiformer_v2" else None
        path = [shims, *sites, str(ROOT), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        if peer.startswith("mace"):
            env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # e3nn 0.4.4 loads its constants with a plain torch.load
        print(f"\n--- {peer} (subprocess, PYTHONPATH={os.pathsep.join(sites)} first, at most {timeout_s:.0f} s)", flush=True)
        reason = None
        try:
            completed = subprocess.run(command, env=env, cwd=ROOT, timeout=timeout_s)
            if completed.returncode != 0:
                reason = f"subprocess exited with code {completed.returncode}"
        except subprocess.TimeoutExpired:
            reason = f"subprocess killed after {timeout_s:.0f} s"
        data = json.loads(out.read_text()) if out.exists() else {}
    if data.get("error"):
        reason = f"failed before measuring: {data['error']}"
    return data.get("rows", []), data.get("models", {}), reason


# ----------------------------------------------------------------------------- main


def ladder_from(args) -> tuple[tuple[int, int], ...]:
    """STEP_LADDER capped at --max-warmup/--max-repeats (at least 1 + 1)."""
    capped = [(max(1, min(w, args.max_warmup)), max(1, min(r, args.max_repeats))) for w, r in STEP_LADDER]
    return tuple(dict.fromkeys(capped))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help=f"atom counts (default {SIZES})")
    parser.add_argument("--models", nargs="+", default=[*OUR_MODELS, *PEERS], choices=[*OUR_MODELS, *PEERS])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--max-warmup", type=int, default=10, help="warm-up steps per case (fewer where time is short)")
    parser.add_argument("--max-repeats", type=int, default=10, help="timed steps per case (fewer where time is short)")
    parser.add_argument("--budget-scale", type=float, help="multiplies every time budget of BUDGETS_S (default 1, smoke 20)")
    parser.add_argument("--deadline-s", type=float,
                        help="wall seconds from start after which no case starts (default 480, smoke 1800)")
    parser.add_argument("--mace-site", default="/tmp/site_mace", help="folder with mace-torch and e3nn 0.4.4 installed")
    parser.add_argument("--cueq-site", default="/tmp/site_cueq",
                        help="folder with cuEquivariance 0.13 (CUDA 13) installed; mace_cueq puts it before --mace-site")
    parser.add_argument("--fairchem-site", default="/tmp/site_fairchem", help="folder with fairchem-core installed")
    parser.add_argument("--equiformer-site", default="/tmp/site_equiformer",
                        help="folder with fairchem-core 1.x (EquiformerV2) installed")
    parser.add_argument("--no-peers", action="store_true", help="only our models")
    parser.add_argument("--chunk-atoms", type=int, help="target atoms per chunk of our models' chunked evaluation "
                        "(direct mode, and conservative with recomputation; default 16384)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"quick check: N in {SMOKE_SIZES}, 1 warm-up and 1 timed step")
    parser.add_argument("--commit", default=None, help="commit to record (the device copy has no .git)")
    parser.add_argument("--out", default=str(Path(os.environ["OUT"]) / "throughput.json") if os.environ.get("OUT")
                        else "throughput.json", help="JSON results (default $OUT/throughput.json if OUT is set)")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)  # internal: run inside a peer subprocess
    args = parser.parse_args(argv)
    if args.chunk_atoms is not None and args.chunk_atoms < 1:
        parser.error(f"--chunk-atoms must be a positive number of atoms, got {args.chunk_atoms}")
    if args.smoke:  # slow CPUs: tiny systems, one step each, budgets that skip nothing
        args.sizes = args.sizes or list(SMOKE_SIZES)
        args.max_warmup = args.max_repeats = 1
    args.sizes = sorted(args.sizes or SIZES)
    args.budget_scale = args.budget_scale or (20.0 if args.smoke else 1.0)
    args.deadline_s = args.deadline_s or (1800.0 if args.smoke else 480.0)
    return args


def main(argv=None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    if args.peer:
        peer_main(args)
        return
    deadline = started + args.deadline_s
    mace_modes = [mode for mode in args.modes if mode == "conservative"]
    peer_modes = {"mace": mace_modes, "mace_cueq": mace_modes, "esen_sm": args.modes,
                  "equiformer_v2": [mode for mode in args.modes if mode == "direct"]}
    sites = {"mace": (args.mace_site,), "mace_cueq": (args.cueq_site, args.mace_site),
             "esen_sm": (args.fairchem_site,), "equiformer_v2": (args.equiformer_site,)}
    data = {
        "what": "throughput and peak GPU memory vs system size (issue 7); see benchmarks/bench_throughput.py",
        "protocol": {
            "system": f"FCC carbon a={LATTICE_CONSTANT} Å, N atoms nearest the supercell centre, Morton order, pbc off",
            "cutoff_A": CUTOFF, "dtype": "float32", "weights": "random (seed 0)", "sizes": args.sizes,
            "modes": args.modes, "max_warmup": args.max_warmup, "max_repeats": args.max_repeats,
            "step_ladder": ladder_from(args), "budgets_s": {f"{m}/{mode}": args.budget_scale * s for (m, mode), s in BUDGETS_S.items()},
            "deadline_s": args.deadline_s, "tf32": torch.backends.cuda.matmul.allow_tf32,
            "peak_memory": "torch.cuda.max_memory_allocated per case (reset before it), includes the resident graph and weights (resident_gb)",
            "neighbor_list": "built once per N outside the timed loop; cpu_vesin_s = vesin on the CPU + CSR + copy to the GPU, "
                             "gpu_vesin_torch_s = vesin-torch on the GPU + sort + CSR",
        },
        "models": {}, "neighbor_lists": [], "rows": [], "not_run": [], "notes": [],
    }
    results = Results(Path(args.out), data)
    if not args.no_peers:
        data["not_run"].extend({"model": model, "mode": mode, "reason": reason} for (model, mode), reason in NOT_RUN.items())

    # Peers first, before this process creates a CUDA context, so each has the whole GPU.
    for peer in [p for p in PEERS if p in args.models and peer_modes[p] and not args.no_peers]:
        budget = sum(args.budget_scale * BUDGETS_S[(peer, mode)] for mode in peer_modes[peer])
        timeout = min(budget + PEER_STARTUP_S, deadline - time.monotonic())
        rows, info, reason = run_peer(peer, args, sites[peer], peer_modes[peer], timeout)
        data["models"].update(info)
        data["rows"].extend(rows)  # the subprocess printed them
        if reason and not rows:
            data["not_run"].extend({"model": peer, "mode": mode, "reason": reason} for mode in peer_modes[peer])
            print(f"not run: {peer}: {reason}", flush=True)
        elif reason:
            data["notes"].append(f"{peer}: {reason} (after the rows it recorded)")
        results.save()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data["environment"] = environment()
    if args.commit:
        data["environment"]["commit"] = args.commit
    if device.type == "cuda":
        data["environment"]["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    data["environment"]["vesin_torch"] = TorchNeighborList is not None
    ours = [name for name in OUR_MODELS if name in args.models]
    contenders, info = e2former_contenders(ours, args.modes, device, args.budget_scale, args.chunk_atoms)
    data["models"].update(info)
    results.save()
    print(f"\n--- ours on {data['environment']['device']}", flush=True)
    print(f"{'model':30s} {'mode':12s} {'N':>8s} {'edges':>10s} {'steps':>6s} {'steps/s':>12s} {'GB':>7s} {'B/atom':>8s}")
    warm_up_neighbor_search(device)
    sweep = Sweep(contenders, args.sizes, device, deadline, ladder_from(args), results.add_row)
    for n in args.sizes:
        if time.monotonic() > deadline:
            sweep.stopped.update({key: value or "skipped (time)" for key, value in sweep.stopped.items()})
            for contender in contenders:
                results.add_row({"model": contender.model, "mode": contender.mode, "num_atoms": n,
                                 "status": sweep.stopped[Sweep.key(contender)]})
            continue
        # The neighbour list is timed at every N, also where every model has stopped.
        graph, neighbor_row = neighbor_list_row(fcc_carbon(n), device)
        data["neighbor_lists"].append(neighbor_row)
        results.save()
        sweep.run_size(graph)
        del graph
    data["total_wall_s"] = time.monotonic() - started
    results.save()
    print_summary(data)
    print(f"\nwrote {args.out} ({data['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
