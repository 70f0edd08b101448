"""Errors of a model against labelled frames: the metrics of training, of the model card and of
`e2former evaluate`.

    e2former evaluate e2former-v2-water-s 'data/water/labelled_*.extxyz.gz' \\
        --split runs/water_small/split.json --subset test --output test.json --plot test.png

Energies are compared per atom (meV/atom), forces per Cartesian component (meV/Å); both as MAE and
RMSE, over all frames, per cluster size ("5 waters", or "7 atoms" for a frame that is not (H2O)n) and,
when the frames record one, per `info["source"]` ("dimer", "md-failure", ...).
The frames of one split of a training run are chosen by the frame ids its split.json recorded.
A model trained on corrected labels (its training config's data.label_correction, recorded in the
checkpoint) is compared with the same corrected labels unless `--labels as-is` asks for the files' own.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from ase.data import chemical_symbols

from e2former_calc.dataset import PackedFrames, cluster_size, load_frames

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (energy error per atom [S], force error [N, 3]) -> loss


def predict_errors(model, data: PackedFrames, batch_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors (prediction - label) of `model` on every frame of `data`: energy [S] (eV, float64) and
    forces [N, 3] (eV/Å), on the CPU. `mode` is "conservative" (F = -dE/dr) or "direct"."""
    energy_errors, force_errors = [], []
    with torch.no_grad():  # conservative forces still get their own autograd pass inside the model
        for start in range(0, len(data), batch_size):
            batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            out = model(batch.graph, compute_forces=True, mode=mode)
            energy_errors.append((out["energy"].detach().double() - batch.energy).cpu())
            force_errors.append((out["forces"] - batch.forces).detach().cpu())
    return torch.cat(energy_errors), torch.cat(force_errors)


def error_metrics(energy_error, force_error, n_atoms, loss: LossFunction | None = None) -> dict:
    """MAE and RMSE of energy errors [S] (eV; reported per atom, meV/atom) and force errors [N, 3]
    (eV/Å; per component, meV/Å) of frames with `n_atoms` [S] atoms, and `loss` of them if given."""
    per_atom = energy_error / n_atoms
    metrics = {} if loss is None else {"loss": loss(per_atom, force_error).item()}
    return metrics | {
        "energy_mae_meV_per_atom": 1000 * per_atom.abs().mean().item(),
        "energy_rmse_meV_per_atom": 1000 * per_atom.pow(2).mean().sqrt().item(),
        "force_mae_meV_per_A": 1000 * force_error.abs().mean().item(),
        "force_rmse_meV_per_A": 1000 * force_error.pow(2).mean().sqrt().item(),
        "n_frames": len(per_atom),
    }


def size_label(atoms) -> str:
    """ "5 waters" for (H2O)5, "7 atoms" for anything else."""
    waters = cluster_size(atoms)
    return f"{waters} waters" if waters > 0 else f"{len(atoms)} atoms"


def metrics_by_size_and_source(frames, energy_error, force_error, loss: LossFunction | None = None) -> dict:
    """{"overall": error_metrics, "per_cluster_size": {"5 waters": error_metrics, ...},
    "per_source": {"dimer": error_metrics, ...}} of `frames`, whose energy errors are [S] (eV) and
    force errors [N, 3] (eV/Å, atoms in frame order). "per_source" groups the frames by
    `info["source"]` ("unknown" for frames without one) and is left out when no frame has a source."""
    n_atoms = torch.tensor([len(atoms) for atoms in frames])
    frame_of_atom = torch.repeat_interleave(torch.arange(len(frames)), n_atoms)

    def per_label(labels: list[str], order: Callable[[str], object]) -> dict:
        """error_metrics of the frames of each distinct label, labels sorted by `order`."""
        metrics = {}
        for label in sorted(set(labels), key=order):
            chosen = torch.tensor([k for k, other in enumerate(labels) if other == label])
            atoms = torch.isin(frame_of_atom, chosen)
            metrics[label] = error_metrics(energy_error[chosen], force_error[atoms], n_atoms[chosen], loss)
        return metrics

    results = {
        "overall": error_metrics(energy_error, force_error, n_atoms, loss),
        "per_cluster_size": per_label([size_label(atoms) for atoms in frames],
                                      order=lambda text: (text.split()[1], int(text.split()[0]))),
    }
    if any("source" in atoms.info for atoms in frames):
        results["per_source"] = per_label([str(atoms.info.get("source", "unknown")) for atoms in frames], order=str)
    return results


def frames_of_split(frames, split_path: Path, subset: str) -> list:
    """The frames whose ids are listed under `subset` ("train", "val" or "test") in a run's split.json."""
    split = json.loads(Path(split_path).read_text())
    if subset not in split:
        raise ValueError(f"{split_path} has no '{subset}' split (train, val and test are the subsets of a run)")
    wanted = set(split[subset])
    chosen = [atoms for atoms in frames if atoms.info["frame_id"] in wanted]  # set by load_frames
    if len(chosen) != len(wanted):
        raise ValueError(f"{len(wanted) - len(chosen)} of the {len(wanted)} '{subset}' frames of {split_path} "
                         "are not in the data files given")
    return chosen


def plot_parity(path: Path, data: PackedFrames, energy_error, force_error, title: str) -> None:
    """Predicted against reference energy per atom and force components, side by side (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_atoms = data.n_atoms.cpu().double()
    reference_energy = (data.energy.cpu() / n_atoms).numpy()
    predicted_energy = reference_energy + (energy_error / n_atoms).numpy()
    reference_force = data.forces.cpu().double().flatten().numpy()
    predicted_force = reference_force + force_error.double().flatten().numpy()
    figure = Figure(figsize=(9, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    for axis, reference, predicted, name, unit in (
        (figure.add_subplot(1, 2, 1), reference_energy, predicted_energy, "energy per atom", "eV/atom"),
        (figure.add_subplot(1, 2, 2), reference_force, predicted_force, "force components", "eV/Å"),
    ):
        low, high = min(reference.min(), predicted.min()), max(reference.max(), predicted.max())
        axis.plot([low, high], [low, high], color="0.6", linewidth=1)
        axis.scatter(reference, predicted, s=4, alpha=0.5)
        axis.set(xlabel=f"reference {name} ({unit})", ylabel=f"predicted ({unit})")
    figure.suptitle(title)
    figure.savefig(path, dpi=150)


def table_row(label: str, metrics: dict) -> str:
    """One row of the `e2former evaluate` table: frames, energy MAE/RMSE (meV/atom), force MAE/RMSE (meV/Å)."""
    return (f"{label:>16} {metrics['n_frames']:>6} {metrics['energy_mae_meV_per_atom']:>8.3f} "
            f"{metrics['energy_rmse_meV_per_atom']:>8.3f} {metrics['force_mae_meV_per_A']:>8.2f} "
            f"{metrics['force_rmse_meV_per_A']:>8.2f}")


def run(arguments: argparse.Namespace) -> int:
    """`e2former evaluate` (arguments declared in e2former_calc.cli, which stays torch-free)."""
    from e2former_calc.checkpoint import load_model, model_description
    from e2former_calc.label_correction import PairCorrection, correct_labels

    model = load_model(arguments.model, device=arguments.device, dtype=arguments.dtype)
    frames = load_frames(arguments.data)
    if arguments.split is not None:
        frames = frames_of_split(frames, arguments.split, arguments.subset)
    training_data = model_description(arguments.model).get("metadata", {}).get("training_config", {}).get("data", {})
    correction = training_data.get("label_correction") if arguments.labels == "trained" else None
    if correction is not None:
        frames = correct_labels(frames, PairCorrection.from_dict(correction))
    unknown = {int(z) for atoms in frames for z in atoms.numbers} - set(model.config.species)
    if unknown:
        raise ValueError(f"the data hold {', '.join(chemical_symbols[z] for z in sorted(unknown))}, which "
                         f"{arguments.model} does not know (it knows {', '.join(chemical_symbols[z] for z in model.config.species)})")
    data = PackedFrames(frames, model.config.cutoff, model.reference_energy.dtype, model.reference_energy.device)
    energy_error, force_error = predict_errors(model, data, arguments.batch_size, arguments.mode)
    results = metrics_by_size_and_source(frames, energy_error, force_error)
    what = f"{arguments.model} on {len(frames)} frames" + (f" ({arguments.subset} of {arguments.split})" if arguments.split else "")
    print(f"{what}, {arguments.mode} forces, {arguments.dtype}")
    if correction is not None:
        print(f"labels corrected as in the model's training (data.label_correction {correction}); --labels as-is to compare with the files' own")
    print(f"{'':>16} {'frames':>6} {'E MAE':>8} {'E RMSE':>8} {'F MAE':>8} {'F RMSE':>8}   (meV/atom, meV/Å)")
    for label, metrics in [("overall", results["overall"]), *results["per_cluster_size"].items()]:
        print(table_row(label, metrics))
    if "per_source" in results:
        print()
        for label, metrics in results["per_source"].items():
            print(table_row(label, metrics))
    if arguments.output is not None:
        record = {"model": str(arguments.model), "data": arguments.data, "split": str(arguments.split) if arguments.split else None,
                  "subset": arguments.subset if arguments.split else None, "mode": arguments.mode, "dtype": arguments.dtype,
                  "label_correction": correction, **results}
        Path(arguments.output).write_text(json.dumps(record, indent=2) + "\n")
    if arguments.plot is not None:
        plot_parity(arguments.plot, data, energy_error, force_error, what)
    return 0
