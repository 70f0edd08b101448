"""The `e2former` command line: md with the TIP3P stand-in on a tiny box, restart through the
CLI, rdf on the trajectory it wrote, and subcommand registration."""

import json

import numpy as np
import pytest
from ase.io import read

from e2former_calc import cli
from e2former_calc.md import read_md_log


def md_arguments(output, steps):
    return ["md", "--model", "tip3p", "--water", "8", "--ensemble", "bussi", "--temperature", "300",
            "--timestep", "1.0", "--steps", str(steps), "--trajectory-interval", "2",
            "--log-interval", "2", "--restart-interval", "4", "--output", str(output),
            "--seed", "3", "--no-progress"]


def test_md_then_rdf_with_tip3p(tmp_path, capsys):
    run_dir, rdf_dir = tmp_path / "md", tmp_path / "rdf"
    assert cli.main(md_arguments(run_dir, 8)) == 0
    assert cli.main(md_arguments(run_dir, 12)) == 0
    assert "(from step 8)" in capsys.readouterr().out

    frames = read(run_dir / "trajectory.extxyz", ":")
    assert [frame.info["step"] for frame in frames] == list(range(0, 13, 2))
    assert frames[0].get_chemical_formula() == "H16O8"
    # The rigid-water constraint held: every O-H distance is TIP3P's 0.9572 Å.
    oh = [frame.get_distance(3 * m, 3 * m + k, mic=True)
          for frame in frames for m in range(8) for k in (1, 2)]
    np.testing.assert_allclose(oh, 0.9572, atol=1e-6)
    columns, n_atoms = read_md_log(run_dir / "md.log")
    assert n_atoms == 24 and list(columns["step"]) == list(range(0, 13, 2))
    assert np.all(np.isfinite(columns["etot_eV"]))

    assert cli.main(["rdf", str(run_dir / "trajectory.extxyz"), "--output", str(rdf_dir),
                     "--skip", "1", "--bin-width", "0.1"]) == 0
    metrics = json.loads((rdf_dir / "rdf_metrics.json").read_text())
    assert metrics["n_frames"] == len(frames) - 1
    assert metrics["experiment"]["name"] == "skinner2013"
    assert metrics["rmax_angstrom"] <= frames[0].cell[0, 0] / 2
    assert metrics["rmse_range_angstrom"][1] <= metrics["rmax_angstrom"]
    assert 0 <= metrics["rmse"] < 5
    table = np.loadtxt(rdf_dir / "rdf.csv", delimiter=",", comments="#", skiprows=2)
    assert table.shape[1] == 2 and np.all(table[:, 1] >= 0)
    assert (rdf_dir / "rdf.png").read_bytes()[:4] == b"\x89PNG"

    # A time window: 3 frames from the second, every other one.
    assert cli.main(["rdf", str(run_dir / "trajectory.extxyz"), "--output", str(tmp_path / "window"),
                     "--skip", "1", "--stride", "2", "--count", "3", "--bin-width", "0.1"]) == 0
    assert json.loads((tmp_path / "window" / "rdf_metrics.json").read_text())["n_frames"] == 3


def test_md_watchdog_failure_gives_exit_status_2(tmp_path, capsys):
    arguments = md_arguments(tmp_path, 4) + ["--max-temperature", "50"]
    assert cli.main(arguments) == 2
    assert "temperature" in capsys.readouterr().err


def test_rdf_refuses_experiment_for_other_pairs(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["rdf", str(tmp_path / "missing.extxyz"), "--output", str(tmp_path),
                  "--pair", "O", "H"])


def test_registered_subcommand_is_dispatched(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    calls = []
    cli.register_subcommand(cli.Subcommand(
        "echo", "repeat a word",
        lambda parser: parser.add_argument("word"),
        lambda arguments: calls.append(arguments.word) or 3,
    ))
    assert cli.main(["echo", "hello"]) == 3
    assert calls == ["hello"]
    with pytest.raises(ValueError, match="already registered"):
        cli.register_subcommand(cli.Subcommand("echo", "again", lambda p: None, lambda a: 0))


def test_models_lists_the_shipped_model_with_its_card_numbers(capsys):
    from e2former_calc.checkpoint import model_description

    assert cli.main(["models", "--json"]) == 0
    listing = {model["name"]: model for model in json.loads(capsys.readouterr().out)}
    shipped = listing["e2former-v2-water-s"]
    description = model_description("e2former-v2-water-s")
    assert shipped["elements"] == ["H", "O"]
    assert shipped["cutoff_angstrom"] == description["cutoff"]
    assert shipped["weights_sha256"] == description["weights_sha256"]
    test = description["metadata"]["metrics"]["test"]["overall"]
    assert shipped["test_force_mae_meV_per_A"] == test["force_mae_meV_per_A"]

    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("e2former-v2-water-s: H O, cutoff 5.0 Å")
    assert description["weights_sha256"][:12] in text
