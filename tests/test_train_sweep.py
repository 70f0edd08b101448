"""benchmarks.train_sweep: recipes trained side by side in `python -m e2former_calc.train` processes, a
failing recipe recorded without stopping the others, the choice made on the validation split only, and
--resume skipping finished recipes.

Data are tiny EMT-labelled water clusters (as in test_train.py), the model a few-channel E2Former-V2 on the CPU.
"""

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml

from benchmarks.train_sweep import load_sweep, main
from emt_water import water_cluster
from e2former_calc.train import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.overrides.channels=8", "model.overrides.num_blocks=1", "model.overrides.num_heads=2",
              "model.overrides.head_dim=4", "model.overrides.cutoff=4.0", "model.overrides.num_radial=6",
              "model.overrides.edge_hidden=8", "model.overrides.avg_num_neighbors=4.0"]


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> Path:
    """A training YAML over 24 frames of 1-3 waters (every 2 frames share a 'snapshot'), batch 2."""
    rng = np.random.default_rng(0)
    frames = []
    for index in range(24):
        atoms = water_cluster(1 + index % 3, rng)
        atoms.info.update(method="EMT", snapshot=index // 2)
        frames.append(atoms)
    folder = tmp_path_factory.mktemp("sweep_data")
    ase.io.write(folder / "frames.extxyz", frames, format="extxyz")
    config = {
        "data": {"paths": [str(folder / "frames.extxyz")], "val_fraction": 0.25, "test_fraction": 0.25,
                 "group_by": ["snapshot"]},
        "loss": {"energy_weight": 1.0, "force_weight": 0.1},
        "optimizer": {"warmup_epochs": 1},
        "epochs": 100, "batch_size": 2, "ema_decay": 0.5,
    }
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_sweep(path: Path, base: Path, common: list[str], recipes: dict[str, list[str]]) -> Path:
    path.write_text(yaml.safe_dump({"base": str(base), "common": common, "recipes": recipes}))
    return path


def validation_score(run_dir: Path) -> float:
    """The selection rule, computed here from the run's own test_metrics.json: F MAE / 40 + E MAE / 1."""
    val = json.loads((run_dir / "test_metrics.json").read_text())["val"]
    return val["force_mae_meV_per_A"] / 40 + val["energy_mae_meV_per_atom"]


def test_sweep_trains_in_processes_records_a_failure_and_resumes(base_config, tmp_path):
    sweep = write_sweep(
        tmp_path / "sweep.yaml", base_config,
        common=["epochs=2", "device=cpu", "optimizer.lr=1e-2", *TINY_MODEL],
        recipes={"fast": [], "slow": ["optimizer.lr=1e-3", "batch_size=4"],
                 "broken": ["optimizer.learning_rate=1e-3"]},  # train rejects the unknown key
    )
    runs, out = tmp_path / "runs", tmp_path / "summary.json"
    command = ["run", str(sweep), "--runs-dir", str(runs), "--out", str(out), "--threads", "1"]
    assert main(command) == 1  # not every recipe finished

    summary = json.loads(out.read_text())
    assert set(summary["runs"]) == {"fast", "slow", "broken"}
    for name in ("fast", "slow"):
        assert (runs / name / "test_metrics.json").exists() and (runs / name / "model.safetensors").exists()
        assert "epoch 2/2 [conservative]" in (runs / f"{name}.log").read_text()  # trained by its own process
        assert summary["runs"][name]["epochs_done"] == 2
        assert summary["runs"][name]["selection_score"] == pytest.approx(validation_score(runs / name))
    resolved = {name: load_config(runs / name / "config.yaml") for name in ("fast", "slow")}
    assert (resolved["fast"].batch_size, resolved["fast"].optimizer.lr) == (2, 1e-2)  # common
    assert (resolved["slow"].batch_size, resolved["slow"].optimizer.lr) == (4, 1e-3)  # the recipe's own win
    assert resolved["slow"].run_dir == str(runs / "slow") and resolved["slow"].model.overrides["channels"] == 8
    scores = {name: validation_score(runs / name) for name in ("fast", "slow")}
    assert scores["fast"] != scores["slow"]
    assert summary["chosen"] == min(scores, key=scores.get)
    broken = summary["runs"]["broken"]
    assert broken["failed"] == "train exited with return code 1" and "selection_score" not in broken
    assert any("unknown keys in optimizer: ['learning_rate']" in line for line in broken["log_tail"])
    assert summary["data"]["split_sizes"] == {"train": 12, "val": 6, "test": 6}
    assert summary["recipes"]["slow"] == ["optimizer.lr=1e-3", "batch_size=4"] and summary["commit"]

    with pytest.raises(SystemExit, match="exist already"):  # a fresh run must not touch existing runs
        main(command)

    def files(name):
        return {path: path.read_bytes() for path in (runs / name / "metrics.jsonl", runs / name / "test_metrics.json",
                                                     runs / f"{name}.log")}

    finished = files("fast")
    slow_epochs = (runs / "slow" / "metrics.jsonl").read_text()
    (runs / "slow" / "test_metrics.json").unlink()  # as if stopped after its last epoch, before the test
    assert main([*command, "--resume"]) == 1  # broken is still broken
    assert files("fast") == finished  # skipped, not re-run
    assert (runs / "slow.log").read_text().count(f"resuming {runs / 'slow'} after epoch 2") == 1
    assert (runs / "slow" / "metrics.jsonl").read_text() == slow_epochs and (runs / "slow" / "test_metrics.json").exists()
    summary = json.loads(out.read_text())
    assert summary["chosen"] == min(scores, key=scores.get) and "failed" in summary["runs"]["broken"]
    assert summary["runs"]["slow"]["selection_score"] == pytest.approx(scores["slow"])


def fake_run(run_dir: Path, val: tuple[float, float], test: tuple[float, float]) -> None:
    """A finished run whose best model has (force MAE meV/Å, energy MAE meV/atom) `val` and `test`."""

    def metrics(force, energy):
        return {"loss": 0.0, "energy_mae_meV_per_atom": energy, "force_mae_meV_per_A": force, "n_frames": 6}

    run_dir.mkdir(parents=True)
    results = {"best_epoch": 3, "force_mode": "conservative", "val": metrics(*val),
               "test": {"overall": metrics(*test), "per_cluster_size": {"2 waters": metrics(*test)}}}
    (run_dir / "test_metrics.json").write_text(json.dumps(results))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": k, "time_s": 30.0}) + "\n" for k in (1, 2, 3)))


def test_choice_uses_the_weighted_validation_score_never_the_test(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "a", val=(40.0, 2.0), test=(90.0, 9.0))  # score 3.0: chosen, though worst on test
    fake_run(runs / "b", val=(20.0, 2.6), test=(10.0, 0.5))  # 3.1: best validation force
    fake_run(runs / "c", val=(120.0, 0.5), test=(10.0, 0.4))  # 3.5: best validation energy
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "base.yaml", [], {name: [] for name in "abcd"})
    out = tmp_path / "summary.json"
    assert main(["summarize", str(sweep), "--runs-dir", str(runs), "--out", str(out)]) == 1  # d never ran
    summary = json.loads(out.read_text())
    assert summary["chosen"] == "a"
    assert [summary["runs"][name]["selection_score"] for name in "abc"] == pytest.approx([3.0, 3.1, 3.5])
    assert summary["runs"]["a"]["epochs_done"] == 3 and summary["runs"]["a"]["train_minutes"] == pytest.approx(1.5)
    assert summary["runs"]["d"]["failed"].startswith("no test_metrics.json") and summary["runs"]["d"]["log_tail"] == []
    printed = capsys.readouterr().out
    assert printed.index("chosen on the validation split: a") < printed.index("test split, read after the choice")
    assert "a (chosen)" in printed

    assert main(["summarize", str(sweep), "--runs-dir", str(runs), "--out", str(out), "--only", "a", "b"]) == 0
    assert set(json.loads(out.read_text())["runs"]) == {"a", "b"}


def test_sweep_file_checks_and_the_water_example(tmp_path):
    example = load_sweep(ROOT / "benchmarks" / "sweeps" / "water_small.yaml")
    assert list(example.recipes) == ["q1", "q2", "q3", "q4", "q5", "q6"]
    resolved = {name: load_config(ROOT / example.base, example.overrides(name)) for name in example.recipes}
    assert {name: config.batch_size for name, config in resolved.items()} == dict(q1=32, q2=32, q3=32, q4=16, q5=32, q6=32)
    assert all(config.max_minutes == 19 for config in resolved.values())
    assert resolved["q5"].model.overrides["channels"] == 128 and resolved["q6"].model.overrides["num_blocks"] == 4
    for bad, message in [
        ({"recipes": {"x": ["epochs=2"]}}, "needs 'base'"),
        ({"base": "b.yaml", "recipes": {"x": ["run_dir=elsewhere"]}}, "run_dir is set by the sweep"),
        ({"base": "b.yaml", "recipes": {"x": ["data.val_fraction=0.5"]}}, "changes the data"),
        ({"base": "b.yaml", "recipes": {"x": {"epochs": 2}}}, "list of 'key=value'"),
        ({"base": "b.yaml", "recipes": {"../x": []}}, "plain directory name"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=message):
            load_sweep(path)


@pytest.mark.parametrize("sweep_file", sorted((ROOT / "benchmarks" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_sweep_builds_its_models(sweep_file):
    from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
    from e2former_calc.train import PRESETS

    sweep = load_sweep(sweep_file)
    for name in sweep.recipes:
        config = load_config(ROOT / sweep.base, sweep.overrides(name))
        model_config = E2FormerConfig.from_dict({**PRESETS[config.model.preset]().to_dict(), **config.model.overrides})
        assert E2FormerV2(model_config).config == model_config
