"""examples/water_nvt.py: a run done in chunks (stopped by --max-minutes and resumed) is the run
done in one go, with ASE's rigid TIP3P as a fast stand-in for the model."""

import json

import numpy as np
import pytest
from ase.io import read
from conftest import load_file


@pytest.fixture(scope="module")
def example():
    return load_file("examples/water_nvt.py", "water_nvt")


def arguments(output, *extra):
    # 8 waters, 0.5 fs: 6 equilibration and 8 production steps, a frame every 2 steps.
    return ["--quick", "--model", "tip3p", "--ensemble", "bussi", "--waters", "8", "--equilibration-ps", "0.003",
            "--production-ps", "0.004", "--trajectory-interval", "2", "--seed", "5", "--output", str(output),
            "--no-progress", *extra]


def test_chunked_run_is_the_straight_run(example, tmp_path):
    assert example.main(arguments(tmp_path / "straight")) == 0
    # --max-minutes 0: every invocation does one MD step, saves and stops.
    for invocations in range(1, 30):
        assert example.main(arguments(tmp_path / "chunked", "--max-minutes", "0")) == 0
        record = json.loads((tmp_path / "chunked" / "run.json").read_text())
        if record["complete"]:
            break
        assert record["status"].startswith("stopped")
    assert invocations == 14  # one step each (the last also finishes the analysis)

    straight = json.loads((tmp_path / "straight" / "run.json").read_text())
    for record in (straight, record):
        assert record["stages"]["equilibration"]["ps_done"] == pytest.approx(0.003)
        assert record["stages"]["production"]["ps_done"] == pytest.approx(0.004)
        assert record["stages"]["production"]["complete"]
    steps_run = [sum(inv["stages"].get(stage, {}).get("steps", 0) for stage in ("equilibration", "production"))
                 for inv in record["invocations"]]
    assert steps_run == [1] * 14
    for stage in ("equilibration", "production"):
        reference = read(tmp_path / "straight" / stage / "trajectory.extxyz", ":")
        chunked = read(tmp_path / "chunked" / stage / "trajectory.extxyz", ":")
        assert [frame.info["step"] for frame in chunked] == [frame.info["step"] for frame in reference]
        for a, b in zip(reference, chunked):
            np.testing.assert_array_equal(a.positions, b.positions)
            np.testing.assert_array_equal(a.get_momenta(), b.get_momenta())
        log = (tmp_path / "straight" / stage / "md.log").read_text()
        assert (tmp_path / "chunked" / stage / "md.log").read_text() == log
    assert (tmp_path / "chunked" / "rdf.csv").read_text() == (tmp_path / "straight" / "rdf.csv").read_text()
    metrics = json.loads((tmp_path / "chunked" / "rdf_metrics.json").read_text())
    assert metrics["production_ps"] == pytest.approx(0.004) and metrics["complete"]
    integrity = straight["molecular_integrity"]  # rigid TIP3P: every O–H stays at 0.9572 Å
    assert integrity["frames"] == 5 and integrity["frames_with_broken_water"] == 0
    assert integrity["longest_OH_bond_angstrom"] == pytest.approx(0.9572, abs=1e-4)


def test_production_continues_from_the_equilibrated_momenta(example, tmp_path):
    assert example.main(arguments(tmp_path)) == 0
    with np.load(tmp_path / "equilibration" / "restart.npz") as end_of_equilibration:
        positions, momenta = end_of_equilibration["positions"], end_of_equilibration["momenta"]
    first_production = read(tmp_path / "production" / "trajectory.extxyz", 0)
    np.testing.assert_allclose(first_production.positions, positions, atol=1e-7)  # extxyz: 8 decimals
    np.testing.assert_allclose(first_production.get_momenta(), momenta, atol=1e-7)


def test_resume_refuses_other_settings(example, tmp_path):
    assert example.main(arguments(tmp_path, "--max-minutes", "0")) == 0
    with pytest.raises(SystemExit, match="seed"):
        example.main(arguments(tmp_path) + ["--seed", "6"])
    assert example.main(arguments(tmp_path)) == 0
    assert example.main(arguments(tmp_path) + ["--production-ps", "0.005"]) == 0  # a longer production is fine
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["stages"]["production"]["ps_done"] == pytest.approx(0.005) and len(record["invocations"]) == 3
    with pytest.raises(SystemExit, match="equilibration-ps must stay"):
        example.main(arguments(tmp_path) + ["--equilibration-ps", "0.004"])
