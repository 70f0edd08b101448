"""Model evaluation on labelled frames (e2former_calc.evaluate, `e2former evaluate`)."""

import json

import ase.io
import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from emt_water import water_cluster
from e2former_calc.calculator import E2FormerCalculator
from e2former_calc.checkpoint import save_model
from e2former_calc.cli import main as cli_main
from e2former_calc.dataset import load_frames
from e2former_calc.evaluate import error_metrics, metrics_by_size_and_source
from e2former_calc.label_correction import PairCorrection
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2


def labelled(atoms):
    atoms.calc = EMT()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = E2FormerConfig(species=(1, 8), channels=8, num_blocks=1, num_heads=2, head_dim=4, cutoff=4.0,
                            num_radial=6, edge_hidden=8, avg_num_neighbors=4.0)
    model = E2FormerV2(config).to(torch.float64)
    model.reference_energy.copy_(torch.tensor([-2.0, -4.0]))
    weights, _ = save_model(model, tmp_path_factory.mktemp("model") / "tiny")
    return weights


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Six EMT-labelled frames: 1-3 water clusters (source "liquid-cluster") and one H2O2 (not (H2O)n, no source)."""
    rng = np.random.default_rng(0)
    frames = [water_cluster(1 + k % 3, rng) for k in range(5)] + [labelled(molecule("H2O2"))]
    for atoms in frames[:5]:
        atoms.info["source"] = "liquid-cluster"
    path = tmp_path_factory.mktemp("data") / "frames.extxyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def test_error_metrics_are_per_atom_and_per_component():
    energy_error = torch.tensor([0.003, -0.012], dtype=torch.float64)  # eV, frames of 3 and 6 atoms
    force_error = torch.tensor([[0.01, -0.02, 0.0]] * 9, dtype=torch.float64)
    metrics = error_metrics(energy_error, force_error, torch.tensor([3, 6]), loss=lambda e, f: e.abs().sum())
    assert metrics["energy_mae_meV_per_atom"] == pytest.approx(1.5)  # (1 + 2) / 2
    assert metrics["energy_rmse_meV_per_atom"] == pytest.approx(np.sqrt(2.5))
    assert metrics["force_mae_meV_per_A"] == pytest.approx(10.0)
    assert metrics["force_rmse_meV_per_A"] == pytest.approx(np.sqrt(500 / 3))
    assert metrics["loss"] == pytest.approx(0.003)
    assert metrics["n_frames"] == 2
    assert "loss" not in error_metrics(energy_error, force_error, torch.tensor([3, 6]))


def test_metrics_by_cluster_size_groups_frames_and_their_atoms():
    frames = [molecule("H2O"), molecule("H2O2"), molecule("H2O")]
    energy_error = torch.tensor([0.03, 0.4, -0.06], dtype=torch.float64)
    force_error = torch.cat([torch.full((3, 3), 0.1), torch.full((4, 3), 1.0), torch.full((3, 3), -0.3)]).double()
    results = metrics_by_size_and_source(frames, energy_error, force_error)
    assert "per_source" not in results  # no frame records a source
    assert list(results["per_cluster_size"]) == ["4 atoms", "1 waters"]
    water = results["per_cluster_size"]["1 waters"]
    assert water["n_frames"] == 2
    assert water["energy_mae_meV_per_atom"] == pytest.approx(15.0)  # (10 + 20) / 2
    assert water["force_mae_meV_per_A"] == pytest.approx(200.0)  # the H2O2 atoms are not in it
    assert results["per_cluster_size"]["4 atoms"]["force_mae_meV_per_A"] == pytest.approx(1000.0)
    assert results["overall"]["n_frames"] == 3


def test_metrics_per_source_group_frames_and_their_atoms():
    frames = [molecule("H2O"), molecule("H2O2"), molecule("H2O"), molecule("H2O")]
    for atoms, source in zip(frames, ["monomer", None, "monomer", "md-failure"]):
        if source is not None:
            atoms.info["source"] = source
    energy_error = torch.tensor([0.03, 0.4, -0.06, 0.3], dtype=torch.float64)  # eV; per atom 10, 100, -20, 100 meV
    force_error = torch.cat([torch.full((3, 3), 0.1), torch.full((4, 3), 1.0), torch.full((3, 3), -0.3),
                             torch.full((3, 3), 0.6)]).double()
    per_source = metrics_by_size_and_source(frames, energy_error, force_error)["per_source"]
    assert list(per_source) == ["md-failure", "monomer", "unknown"]
    monomer = per_source["monomer"]
    assert monomer["n_frames"] == 2
    assert monomer["energy_mae_meV_per_atom"] == pytest.approx(15.0)  # (10 + 20) / 2
    assert monomer["energy_rmse_meV_per_atom"] == pytest.approx(np.sqrt((10**2 + 20**2) / 2))
    assert monomer["force_mae_meV_per_A"] == pytest.approx(200.0)  # (9 x 100 + 9 x 300) / 18
    assert monomer["force_rmse_meV_per_A"] == pytest.approx(np.sqrt((100**2 + 300**2) / 2))
    assert (per_source["unknown"]["n_frames"], per_source["unknown"]["force_mae_meV_per_A"]) == (1, pytest.approx(1000.0))
    assert per_source["md-failure"]["energy_mae_meV_per_atom"] == pytest.approx(100.0)
    assert per_source["md-failure"]["force_mae_meV_per_A"] == pytest.approx(600.0)


def test_cli_matches_the_calculator_frame_by_frame(checkpoint, data_file, tmp_path, capsys):
    out, plot = tmp_path / "eval.json", tmp_path / "parity.png"
    assert cli_main(["evaluate", str(checkpoint), str(data_file), "--output", str(out), "--plot", str(plot),
                     "--batch-size", "4"]) == 0
    results = json.loads(out.read_text())
    # The same errors through the ASE calculator, one frame at a time.
    calculator = E2FormerCalculator(model=checkpoint, device="cpu", dtype="float64")
    energy_errors, force_errors = [], []
    for atoms in ase.io.read(data_file, index=":"):
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = calculator
        energy_errors.append((atoms.get_potential_energy() - energy) / len(atoms))
        force_errors.append(atoms.get_forces() - forces)
    overall = results["overall"]
    assert overall["n_frames"] == 6
    assert overall["energy_mae_meV_per_atom"] == pytest.approx(1000 * np.mean(np.abs(energy_errors)), rel=1e-9)
    assert overall["force_mae_meV_per_A"] == pytest.approx(1000 * np.mean(np.abs(np.concatenate(force_errors))), rel=1e-9)
    assert sum(m["n_frames"] for m in results["per_cluster_size"].values()) == 6
    assert "4 atoms" in results["per_cluster_size"]
    assert {name: m["n_frames"] for name, m in results["per_source"].items()} == {"liquid-cluster": 5, "unknown": 1}
    assert plot.read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert "overall" in table and table.index("4 atoms") < table.index("\n\n") < table.index("liquid-cluster")


def test_cli_evaluates_one_subset_of_a_runs_split(checkpoint, data_file, tmp_path):
    ids = [atoms.info["frame_id"] for atoms in load_frames([str(data_file)])]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"seed": 0, "group_by": [], "train": ids[:4], "val": [], "test": ids[4:]}))
    out = tmp_path / "test.json"
    cli_main(["evaluate", str(checkpoint), str(data_file), "--split", str(split), "--output", str(out)])
    results = json.loads(out.read_text())
    assert results["overall"]["n_frames"] == 2 and results["subset"] == "test"
    split.write_text(json.dumps({"train": [], "val": [], "test": ids[4:] + ["0123456789abcdef"]}))
    with pytest.raises(ValueError, match="1 of the 3 'test' frames .* are not in the data files"):
        cli_main(["evaluate", str(checkpoint), str(data_file), "--split", str(split)])


def test_unknown_elements_are_named(checkpoint, tmp_path):
    path = tmp_path / "methanol.extxyz"
    ase.io.write(path, labelled(molecule("CH3OH")), format="extxyz")
    with pytest.raises(ValueError, match=r"the data hold C, which .* does not know \(it knows H, O\)"):
        cli_main(["evaluate", str(checkpoint), str(path)])


def test_a_model_trained_on_corrected_labels_is_compared_with_corrected_labels(checkpoint, data_file, tmp_path, capsys):
    description = json.loads(checkpoint.with_suffix(".json").read_text())
    correction = {"amplitude_eV": 0.5, "decay_per_A": 0.5, "switch_on_A": 3.0, "cutoff_A": 4.0}
    description["metadata"] = {"training_config": {"data": {"label_correction": correction}}}
    corrected_checkpoint = tmp_path / "corrected.json"
    corrected_checkpoint.write_text(json.dumps(description))
    (tmp_path / "corrected.safetensors").write_bytes(checkpoint.read_bytes())
    results = {}
    for labels in ("trained", "as-is"):
        out = tmp_path / f"{labels}.json"
        cli_main(["evaluate", str(corrected_checkpoint), str(data_file), "--labels", labels, "--output", str(out)])
        results[labels] = json.loads(out.read_text())
    assert results["trained"]["label_correction"] == correction and results["as-is"]["label_correction"] is None
    assert "labels corrected as in the model's training" in capsys.readouterr().out
    # the mean signed energy error moves by the mean correction per atom: the MAEs must differ
    frames = load_frames([str(data_file)])
    assert any(PairCorrection.from_dict(correction).energy_and_forces(atoms)[0] > 0.01 for atoms in frames)
    assert results["trained"]["overall"]["energy_mae_meV_per_atom"] != pytest.approx(results["as-is"]["overall"]["energy_mae_meV_per_atom"])

