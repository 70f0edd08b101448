"""The ``e2former`` command line: one subcommand per task (``md``, ``rdf``, ...).

Each subcommand is a `Subcommand` (name, help, a function adding its arguments to an argparse
parser, a function running it from the parsed namespace) handed to `register_subcommand`.
To add one, say ``train``, write a module that calls `register_subcommand` at import time
(keep heavy imports such as torch inside its run function, so ``e2former --help`` stays quick)
and add the module's name to SUBCOMMAND_MODULES below.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

# Modules imported when the parser is built; importing one registers its subcommands.
SUBCOMMAND_MODULES: tuple[str, ...] = ()


@dataclass(frozen=True)
class Subcommand:
    """`run` returns the process exit status (None counts as 0)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(subcommand: Subcommand) -> None:
    """Make `subcommand` available as ``e2former <name>``; a name can be registered once."""
    if subcommand.name in SUBCOMMANDS:
        raise ValueError(f"subcommand {subcommand.name!r} is already registered")
    SUBCOMMANDS[subcommand.name] = subcommand


def build_parser() -> argparse.ArgumentParser:
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="e2former", description="E2Former-V2 calculator tools: MD, analysis, training and evaluation."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS.values():
        subparser = commands.add_parser(
            subcommand.name, help=subcommand.help, description=subcommand.help
        )
        subcommand.add_arguments(subparser)
        subparser.set_defaults(run=subcommand.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return arguments.run(arguments) or 0


# ---------------------------------------------------------------------------------------------
# e2former md


def rigid_tip3p_water(atoms: Atoms) -> Atoms:
    """Set up `atoms` (water ordered O, H, H per molecule) for ASE's TIP3P, in place.

    Molecules are made whole (TIP3P images molecules by their oxygen), the three distances of
    each molecule are fixed with FixBondLengths (rigid water) and the calculator is attached
    with a cutoff of 7 Å or half the shortest edge of a smaller orthorhombic periodic cell.
    """
    symbols = atoms.get_chemical_symbols()
    molecules = range(0, len(atoms), 3)
    if len(atoms) % 3 or any(symbols[k : k + 3] != ["O", "H", "H"] for k in molecules):
        raise ValueError("TIP3P needs water molecules ordered O, H, H")
    from ase.calculators.tip3p import TIP3P
    from ase.constraints import FixBondLengths
    from ase.geometry import find_mic

    positions = atoms.get_positions()
    oxygens = positions[0::3]
    for hydrogen in (1, 2):
        offsets, _ = find_mic(positions[hydrogen::3] - oxygens, atoms.cell, atoms.pbc)
        positions[hydrogen::3] = oxygens + offsets
    atoms.set_constraint()
    atoms.set_positions(positions)
    n_molecules = len(atoms) // 3
    bonds = [(3 * m + k, 3 * m + (k + 1) % 3) for m in range(n_molecules) for k in range(3)]
    atoms.set_constraint(FixBondLengths(bonds))
    periodic_edges = np.diag(atoms.cell.array)[atoms.pbc]
    cutoff = min([7.0, *(periodic_edges / 2)])
    atoms.calc = TIP3P(rc=cutoff, width=min(1.0, cutoff / 2))
    return atoms


def add_acceleration_arguments(parser: argparse.ArgumentParser) -> None:
    """--skin and --cuda-graph of an MD command (resolved by calculator.md_acceleration)."""
    parser.add_argument("--skin", type=float, default=None,
                        help="Verlet neighbour-list skin, Å (0: search every step; default 0.5 with CUDA graphs, else 1)")
    parser.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                        help="replay each step as one captured CUDA graph (needs CUDA and skin > 0; auto: on CUDA)")


def _add_md_arguments(parser: argparse.ArgumentParser) -> None:
    from e2former_calc.md import ENSEMBLES

    parser.add_argument("--model", required=True,
                        help="pretrained model name or checkpoint path, or 'tip3p' for ASE's "
                             "rigid TIP3P water (a classical stand-in)")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--structure", type=Path, help="starting structure (any ASE-readable file)")
    start.add_argument("--water", type=int, metavar="N", help="start from a box of N waters")
    parser.add_argument("--density", type=float, default=0.997, help="water box density, g/cm^3")
    parser.add_argument("--ensemble", choices=ENSEMBLES, default="bussi")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--steps", type=int, required=True, help="total steps of the run")
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coupling-time", type=float, default=100.0, help="thermostat time, fs")
    parser.add_argument("--trajectory-interval", type=int, default=10)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--restart-interval", type=int, default=100)
    parser.add_argument("--no-restart", action="store_true",
                        help="start afresh even if OUTPUT holds a restart file")
    parser.add_argument("--max-temperature", type=float, default=5000.0,
                        help="watchdog limit, K")
    parser.add_argument("--max-energy-change", type=float, default=1.0,
                        help="watchdog limit on |Epot - Epot(0)|, eV/atom")
    parser.add_argument("--device", help="model device (calculator default if omitted)")
    parser.add_argument("--dtype", choices=("float32", "float64"), help="model precision")
    parser.add_argument("--mode", help="calculator force mode (calculator default if omitted)")
    add_acceleration_arguments(parser)
    parser.add_argument("--no-progress", action="store_true")


def _run_md(arguments: argparse.Namespace) -> int:
    from ase.io import read

    from e2former_calc.md import MDWatchdogError, Watchdog, run_md

    if arguments.water is not None:
        from e2former_calc.water import build_water_box

        atoms = build_water_box(arguments.water, arguments.density, seed=arguments.seed)
    else:
        atoms = read(arguments.structure)
    if arguments.model.lower() == "tip3p":
        rigid_tip3p_water(atoms)
    else:
        from e2former_calc.calculator import E2FormerCalculator, md_acceleration

        options = {name: getattr(arguments, name) for name in ("device", "dtype", "mode")}
        options = {k: v for k, v in options.items() if v is not None}
        skin, cuda_graph = md_acceleration(options.get("device", "auto"), arguments.skin, arguments.cuda_graph)
        atoms.calc = E2FormerCalculator(model=arguments.model, skin=skin, cuda_graph=cuda_graph, **options)
    try:
        result = run_md(
            atoms,
            ensemble=arguments.ensemble,
            temperature_K=arguments.temperature,
            timestep_fs=arguments.timestep,
            steps=arguments.steps,
            output_dir=arguments.output,
            seed=arguments.seed,
            trajectory_interval=arguments.trajectory_interval,
            log_interval=arguments.log_interval,
            restart_interval=arguments.restart_interval,
            coupling_time_fs=arguments.coupling_time,
            restart=not arguments.no_restart,
            progress=not arguments.no_progress,
            watchdog=Watchdog(arguments.max_temperature, arguments.max_energy_change),
        )
    except MDWatchdogError as error:
        print(f"e2former md: {error}", file=sys.stderr)
        return 2
    print(f"{result.steps} steps done (from step {result.started_from_step}); "
          f"final T = {result.final_temperature_K:.1f} K")
    print(f"trajectory: {result.trajectory_path}\nlog: {result.log_path}")
    return 0


# ---------------------------------------------------------------------------------------------
# e2former rdf


def _add_rdf_arguments(parser: argparse.ArgumentParser) -> None:
    from e2former_calc.rdf import EXPERIMENTS

    parser.add_argument("trajectory", type=Path, help="trajectory file (any ASE-readable)")
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    parser.add_argument("--skip", type=int, default=0, help="frames to drop at the start")
    parser.add_argument("--stride", type=int, default=1, help="use every STRIDE-th frame")
    parser.add_argument("--count", type=int, default=None,
                        help="use at most COUNT frames after --skip (a time window; default: all)")
    parser.add_argument("--pair", nargs=2, default=("O", "O"), metavar=("A", "B"))
    parser.add_argument("--rmax", type=float,
                        help="Å; default and upper limit: half the shortest cell height")
    parser.add_argument("--bin-width", type=float, default=0.05, help="Å")
    parser.add_argument("--experiment", choices=(*EXPERIMENTS, "none"), default="skinner2013",
                        help="experimental O-O table to compare with")


def _run_rdf(arguments: argparse.Namespace) -> int:
    from ase.io import iread

    from e2former_calc.rdf import (
        compare_with_experiment,
        compute_rdf,
        load_experimental_rdf,
        plot_rdf,
        rdf_metrics,
        write_rdf_csv,
    )

    pair = tuple(arguments.pair)
    experiment = None if arguments.experiment == "none" else arguments.experiment
    if experiment is not None and pair != ("O", "O"):
        raise SystemExit("e2former rdf: the experimental tables are O-O; use --experiment none")
    stop = "" if arguments.count is None else arguments.skip + arguments.count * arguments.stride
    frames = iread(arguments.trajectory, index=f"{arguments.skip}:{stop}:{arguments.stride}")
    result = compute_rdf(frames, pair=pair, rmax=arguments.rmax, bin_width=arguments.bin_width)
    output = arguments.output
    output.mkdir(parents=True, exist_ok=True)
    write_rdf_csv(output / "rdf.csv", result)
    if experiment is None:
        metrics = rdf_metrics(result.r, result.g, result.partner_density)
        reference = None
    else:
        reference = load_experimental_rdf(experiment)
        metrics = compare_with_experiment(result, reference)
    metrics.update(trajectory=str(arguments.trajectory), n_frames=result.n_frames,
                   pair=list(pair), rmax_angstrom=result.rmax)
    (output / "rdf_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_rdf(output / "rdf.png", result, experiment=reference)
    print(f"g_{''.join(pair)}(r) from {result.n_frames} frames up to {result.rmax:.2f} Å "
          f"written to {output}")
    return 0


register_subcommand(Subcommand("md", "run molecular dynamics", _add_md_arguments, _run_md))
register_subcommand(
    Subcommand("rdf", "radial distribution function of a trajectory, against experiment",
               _add_rdf_arguments, _run_rdf)
)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="training config (YAML), e.g. examples/train_water_small.yaml")
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's run_dir exactly")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="change a config value, e.g. optimizer.lr=1e-4 (repeatable)")
    parser.add_argument("--stop-after", type=int, metavar="EPOCHS", help="stop this invocation after EPOCHS epochs")


def _run_train(arguments: argparse.Namespace) -> int:
    from e2former_calc.train import run

    return run(arguments)


register_subcommand(Subcommand("train", "train a model from a YAML config", _add_train_arguments, _run_train))


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registered model name or checkpoint path (.safetensors)")
    parser.add_argument("data", nargs="+", help="labelled extxyz files or glob patterns (quote them), gzip is fine")
    parser.add_argument("--split", type=Path, help="a training run's split.json: evaluate one of its subsets")
    parser.add_argument("--subset", choices=("train", "val", "test"), default="test", help="with --split (default test)")
    parser.add_argument("--mode", choices=("conservative", "direct"), default="conservative", help="force mode")
    parser.add_argument("--labels", choices=("trained", "as-is"), default="trained",
                        help="trained: add the label correction the model was trained with, if any (default); "
                             "as-is: the files' labels")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per model call")
    parser.add_argument("--output", type=Path, help="write the metrics as JSON")
    parser.add_argument("--plot", type=Path, help="write a parity plot (PNG)")


def _run_evaluate(arguments: argparse.Namespace) -> int:
    from e2former_calc.evaluate import run

    return run(arguments)


register_subcommand(Subcommand("evaluate", "energy and force errors of a model on labelled frames",
                               _add_evaluate_arguments, _run_evaluate))


# ---------------------------------------------------------------------------------------------
# e2former models


def _add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


def shipped_models() -> list[dict]:
    """Each registered model's name, elements, cutoff (Å), held-out test errors, weights hash and card."""
    from e2former_calc.checkpoint import PRETRAINED_DIR, model_description, registered_models

    card = PRETRAINED_DIR / "MODEL_CARD.md"
    listing = []
    for name, entry in registered_models().items():
        description = model_description(name)
        test = description.get("metadata", {}).get("metrics", {}).get("test", {}).get("overall", {})
        listing.append({
            "name": name,
            "elements": [chemical_symbols[number] for number in description["species"]],
            "cutoff_angstrom": description["cutoff"],
            "test_energy_mae_meV_per_atom": test.get("energy_mae_meV_per_atom"),
            "test_force_mae_meV_per_A": test.get("force_mae_meV_per_A"),
            "weights_sha256": description["weights_sha256"],
            "description": entry["description"],
            "card": str(card) if card.exists() else None,
        })
    return listing


def _run_models(arguments: argparse.Namespace) -> int:
    listing = shipped_models()
    if arguments.json:
        print(json.dumps(listing, indent=2))
        return 0
    for model in listing:
        errors = (f"test E MAE {model['test_energy_mae_meV_per_atom']:.2f} meV/atom, "
                  f"F MAE {model['test_force_mae_meV_per_A']:.1f} meV/Å"
                  if model["test_force_mae_meV_per_A"] is not None else "no test metrics recorded")
        print(f"{model['name']}: {' '.join(model['elements'])}, cutoff {model['cutoff_angstrom']} Å, {errors}, "
              f"sha256 {model['weights_sha256'][:12]}…\n    {model['description']}\n    card: {model['card']}")
    return 0


register_subcommand(Subcommand("models", "list the shipped pretrained models", _add_models_arguments, _run_models))
