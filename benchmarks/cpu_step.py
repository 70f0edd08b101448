"""Calculator time per MD step on the CPU (forces and stress of a periodic water box), optionally side by
side with the attention reference of an earlier commit (the CPU path of the network).

    python -m benchmarks.cpu_step --waters 64 --calls 20 --reference-from 1818efd --out DIR

Each call moves the atoms a little (so the graph is updated as in MD, 1 Å skin) and asks for forces
and stress. Prints seconds per call for each variant and writes DIR/cpu_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from benchmarks.common import environment
from e2former_calc import E2FormerCalculator
from e2former_calc.water import build_water_box

REFERENCE_FILE = "kernels/neighbor_attention_reference.py"


def reference_from(commit: str):
    """neighbor_attention_reference as it was at `commit` (loaded from git, not installed)."""
    source = subprocess.run(["git", "show", f"{commit}:{REFERENCE_FILE}"], capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location(f"reference_{commit}", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module.neighbor_attention_reference


def seconds_per_call(waters: int, calls: int, dtype: str) -> float:
    atoms = build_water_box(waters, seed=0)
    atoms.calc = E2FormerCalculator("e2former-v2-water-s", device="cpu", dtype=dtype, skin=1.0)
    atoms.get_forces()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(calls):
        atoms.positions += rng.normal(scale=0.01, size=atoms.positions.shape)
        atoms.get_forces()
        atoms.get_stress()
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waters", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reference-from", metavar="COMMIT", help="also time the attention reference of this commit")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    variants = {"this tree": None}
    if arguments.reference_from:
        variants[f"reference of {arguments.reference_from}"] = reference_from(arguments.reference_from)
    results = {}
    for name, reference in variants.items():
        patch = (mock.patch("e2former_calc.kernels.neighbor_attention.neighbor_attention_reference", reference)
                 if reference else contextlib.nullcontext())
        with patch:
            results[name] = seconds_per_call(arguments.waters, arguments.calls, arguments.dtype)
        print(f"{name:>28}: {results[name]:.3f} s per call ({3 * arguments.waters} atoms, forces + stress, "
              f"{arguments.dtype}, {arguments.threads} threads)")
    record = {**environment(), "command": " ".join([sys.executable, "-m", "benchmarks.cpu_step", *sys.argv[1:]]),
              "waters": arguments.waters, "calls": arguments.calls, "dtype": arguments.dtype,
              "threads": arguments.threads, "seconds_per_call": results}
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "cpu_step.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
