"""Seconds per training step of the water model, to choose batch size and attention path for training.

    python -m benchmarks.bench_training_step [--out DIR] [--steps 20]

One step = forward, loss on energy and forces, backward, AdamW step, as in e2former_calc.train.
Conservative steps need double backward, so they always run the PyTorch reference attention;
direct steps are timed with the Triton kernel and with the reference. Prints a table and writes
training_step.json (with the run's environment) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import environment
from e2former_calc.dataset import PackedFrames, load_frames
from e2former_calc.models import e2former
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2


def time_steps(model, data: PackedFrames, batch_size: int, mode: str, steps: int) -> float:
    """Mean seconds per optimiser step over `steps` steps after 3 warm-up steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step():
        batch = data.batch(torch.randperm(len(data), generator=generator)[:batch_size])
        out = model(batch.graph, compute_forces=True, mode=mode, create_graph=mode == "conservative")
        energy_error = ((out["energy"].double() - batch.energy) / batch.n_atoms).float()
        loss = energy_error.pow(2).mean() + (out["forces"] - batch.forces).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if data.energy.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if data.energy.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    frames = load_frames(["data/water/labelled_*.extxyz.gz"])
    data = PackedFrames(frames, 5.0, torch.float32, device)
    torch.manual_seed(0)
    model = E2FormerV2(E2FormerConfig.water_small()).to(device)
    kernel_attention = e2former.neighbor_attention

    def reference_attention(*inputs, **options):
        return kernel_attention(*inputs, **{**options, "use_kernel": False})

    rows = []
    for batch_size in args.batch_sizes:
        for mode, attention in (("direct", "kernel"), ("direct", "reference"), ("conservative", "reference")):
            e2former.neighbor_attention = kernel_attention if attention == "kernel" else reference_attention
            seconds = time_steps(model, data, batch_size, mode, args.steps)
            rows.append({"batch_size": batch_size, "mode": mode, "attention": attention,
                         "ms_per_step": 1e3 * seconds, "frames_per_s": batch_size / seconds})
            print(f"batch {batch_size:3d} {mode:12s} {attention:9s} {1e3 * seconds:8.1f} ms/step "
                  f"{batch_size / seconds:8.1f} frames/s", flush=True)
    e2former.neighbor_attention = kernel_attention
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_step.json").write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
