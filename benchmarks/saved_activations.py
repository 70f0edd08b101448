"""Bytes per atom that conservative mode keeps for the force pass outside the recomputed blocks (CPU).

With `recompute_blocks` each transformer block keeps only its input; what else autograd keeps until
the force pass (the embedding's per-edge terms, the final norm and energy head, ...) scales with
every atom and sets, with one chunk's working set, the peak memory of the largest systems. This
counts it, device-independently, with a saved-tensor hook around the forward pass (the
checkpointed blocks register their own hooks, so what they recompute is not counted), grouped by
leading dimension: per edge [E, ...], per atom [N, ...], other (e.g. one chunk's edges).

    python -m benchmarks.saved_activations --atoms 600 --chunk-atoms 200 --out DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

import torch

from benchmarks.bench_throughput import e2former_configs, fcc_carbon
from benchmarks.common import environment
from e2former_calc.models.e2former import E2FormerV2
from e2former_calc.neighbors import build_graph


def saved_bytes_per_atom(name: str, num_atoms: int, chunk_atoms: int) -> dict:
    """{"edge" | "node" | "other": kB/atom kept for the force pass, "edges_per_atom": float}."""
    torch.manual_seed(0)
    config = e2former_configs()[name]
    model = E2FormerV2(config).eval()
    model.recompute_blocks, model.chunk_atoms = True, chunk_atoms
    graph = build_graph([fcc_carbon(num_atoms)], config.cutoff, torch.float32, torch.device("cpu"))
    N, E = graph.num_atoms, graph.num_edges
    kept, seen = collections.Counter(), set()

    def count(tensor: torch.Tensor) -> torch.Tensor:
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity not in seen:  # a tensor saved by several operations is stored once
            seen.add(identity)
            leading = tensor.shape[0] if tensor.dim() else None
            kind = "edge" if leading == E else "node" if leading == N else "other"
            kept[kind] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        model(graph, compute_forces=True, mode="conservative")
    return {**{kind: kept[kind] / N / 1e3 for kind in ("edge", "node", "other")}, "edges_per_atom": E / N}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=600)
    parser.add_argument("--chunk-atoms", type=int, default=200, help="chunk size (several chunks, as in large systems)")
    parser.add_argument("--models", nargs="+", default=["e2former_paper", "e2former_water_small"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    results = {}
    for name in args.models:
        results[name] = saved_bytes_per_atom(name, args.atoms, args.chunk_atoms)
        row = results[name]
        print(f"{name:22s} {row['edges_per_atom']:.0f} edges/atom: kB/atom kept per edge tensor {row['edge']:.1f}, "
              f"per atom tensor {row['node']:.1f}, other {row['other']:.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"what": __doc__.splitlines()[0], "atoms": args.atoms, "chunk_atoms": args.chunk_atoms,
              "units": "kB per atom", "results": results, "environment": environment()}
    (args.out / "saved_activations.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out / 'saved_activations.json'}")


if __name__ == "__main__":
    main()
