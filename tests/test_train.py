"""The training pipeline (issue: training): data splits, reference energies, loop, resume, divergence.

Data are tiny synthetic water clusters labelled with ASE's EMT (energies and forces consistent), the
model is a few-channel E2Former-V2, everything on the CPU.
"""

import json
import math
from collections import Counter
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from safetensors.torch import load_file

from emt_water import water_cluster
from e2former_calc.checkpoint import load_model
from e2former_calc.dataset import (element_counts, extend_split, fit_reference_energies, frame_id, frame_labels, load_frames,
                                   split_frames)
from e2former_calc.cli import main as cli_main
from e2former_calc.label_correction import PairCorrection, correct_labels
import e2former_calc.train as train_module
from e2former_calc.train import LossConfig, TrainConfig, TrainingDiverged, load_config, loss_terms, train, warmup_cosine

TINY_MODEL = dict(channels=8, num_blocks=1, num_heads=2, head_dim=4, cutoff=4.0, num_radial=6,
                  edge_hidden=8, avg_num_neighbors=4.0)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_water_small.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny models only lose time to thread hand-offs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """24 frames of 1-3 waters in two files (one gzipped); every 2 frames share a 'snapshot'."""
    rng = np.random.default_rng(0)
    frames = []
    for index in range(24):
        atoms = water_cluster(1 + index % 3, rng)
        atoms.info.update(charge=0, spin=1, method="EMT", n_waters=1 + index % 3, snapshot=index // 2, temperature_K=300.0)
        frames.append(atoms)
    folder = tmp_path_factory.mktemp("data")
    ase.io.write(folder / "part_a.extxyz", frames[:12], format="extxyz")
    ase.io.write(folder / "part_b.extxyz.gz", frames[12:], format="extxyz")
    return [str(folder / "part_*.extxyz*")]


def make_config(data_files, run_dir, **changes) -> TrainConfig:
    raw = {
        "data": {"paths": data_files, "val_fraction": 0.25, "test_fraction": 0.25, "group_by": ["temperature_K", "snapshot"]},
        "model": {"preset": "water_small", "overrides": TINY_MODEL},
        "optimizer": {"lr": 1e-2, "warmup_epochs": 1},
        "loss": {"energy_weight": 1.0, "force_weight": 0.1},
        "run_dir": str(run_dir), "epochs": 2, "batch_size": 2, "ema_decay": 0.5, "device": "cpu",
    }
    for key, value in changes.items():
        section, _, leaf = key.rpartition("__")
        (raw.setdefault(section, {}) if section else raw)[leaf] = value
    return TrainConfig.from_dict(raw)


def read_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_times(log):
    return [{k: v for k, v in line.items() if k != "time_s"} for line in log]


def blow_up(monkeypatch, epoch: int, times: float = math.inf) -> list[int]:
    """Make the 0-based `epoch` diverge on its first `times` attempts: it trains as usual (model, EMA,
    optimiser and scheduler move on), then the weights turn NaN and the real train_epoch raises
    TrainingDiverged at its first batch. Returns the list of epochs attempted."""
    real, attempts = train_module.train_epoch, []

    def train_epoch(model, ema, optimizer, scheduler, data, config, index, mode):
        attempts.append(index)
        metrics = real(model, ema, optimizer, scheduler, data, config, index, mode)
        if index == epoch and attempts.count(index) <= times:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(math.nan)
            real(model, ema, optimizer, scheduler, data, config, index, mode)
            raise AssertionError("NaN weights trained without diverging")
        return metrics

    monkeypatch.setattr(train_module, "train_epoch", train_epoch)
    return attempts


def test_reference_fit_recovers_known_element_energies():
    rng = np.random.default_rng(1)
    truth = np.array([-13.6, -1029.0, -2041.5])  # eV per H, C, O
    counts = rng.integers(0, 8, size=(40, 3)).astype(float)
    energies = counts @ truth + rng.normal(scale=1e-3, size=40)  # small "interaction" noise
    fitted, rank = fit_reference_energies(counts, energies)
    assert rank == 3
    np.testing.assert_allclose(fitted, truth, atol=2e-3)
    # Pure water (H always twice O) leaves one direction undetermined; totals are still reproduced.
    water = np.stack([2 * np.arange(1, 9), np.arange(1, 9)], axis=1).astype(float)
    fitted, rank = fit_reference_energies(water, water @ np.array([-13.6, -2041.5]))
    assert rank == 1
    np.testing.assert_allclose(water @ fitted, water @ np.array([-13.6, -2041.5]), rtol=1e-12)


def test_split_is_deterministic_disjoint_and_grouped(data_files):
    frames = load_frames(data_files)
    assert len(frames) == 24
    split = split_frames(frames, 0.25, 0.25, seed=3, group_by=["temperature_K", "snapshot"])
    ids = {name: {frames[k].info["frame_id"] for k in indices} for name, indices in split.items()}
    assert sum(map(len, ids.values())) == 24 and len(set.union(*ids.values())) == 24  # disjoint and complete
    assert len(ids["test"]) >= 6 and len(ids["val"]) >= 6 and len(ids["train"]) >= 8
    for name, indices in split.items():  # no snapshot on two sides
        snapshots = {frames[k].info["snapshot"] for k in indices}
        others = {frames[k].info["snapshot"] for other, rest in split.items() if other != name for k in rest}
        assert not snapshots & others
    # Same membership by frame id from reversed file order; another seed gives another split.
    reversed_frames = frames[::-1]
    again = split_frames(reversed_frames, 0.25, 0.25, seed=3, group_by=["temperature_K", "snapshot"])
    assert {name: {reversed_frames[k].info["frame_id"] for k in indices} for name, indices in again.items()} == ids
    other = split_frames(frames, 0.25, 0.25, seed=4, group_by=["temperature_K", "snapshot"])
    assert {frames[k].info["frame_id"] for k in other["test"]} != ids["test"]
    # Frame ids depend on the configuration only.
    moved = frames[0].copy()
    moved.positions[0, 0] += 1e-3
    assert frame_id(frames[0].copy()) == frames[0].info["frame_id"] != frame_id(moved)


def sourced_frames() -> list[Atoms]:
    """93 one-atom frames (unique positions) with a 'source' and mostly a 'snapshot' (the group key):
    liquid 40 (4 per snapshot 0-9), dimer 20 (2 per snapshot 0-9: carved from the liquid snapshots, so
    each snapshot group spans both sources), monomer 30 (no snapshot: each its own group),
    md-failure 3 (one group, snapshot 100)."""
    kinds = [("liquid", k // 4) for k in range(40)] + [("dimer", k % 10) for k in range(20)]
    kinds += [("monomer", None)] * 30 + [("md-failure", 100)] * 3
    frames = []
    for index, (source, snapshot) in enumerate(kinds):
        atoms = Atoms("H", positions=[[0.5 * index, 0.0, 0.0]])
        atoms.info["source"] = source
        if snapshot is not None:
            atoms.info["snapshot"] = snapshot
        frames.append(atoms)
    return frames


def sources_per_subset(frames, split) -> dict[str, dict[str, int]]:
    return {name: dict(Counter(str(frames[k].info.get("source")) for k in indices)) for name, indices in split.items()}


def test_stratified_split_holds_out_every_source_in_proportion():
    frames = sourced_frames()
    without_monomer_source = sourced_frames()
    for atoms in without_monomer_source[60:90]:  # frames without the key form a stratum of their own
        del atoms.info["source"]
    for seed in range(5):
        split = split_frames(frames, 0.2, 0.2, seed=seed, group_by=["snapshot"], stratify_by="source")
        # floor(0.2 x stratum size) of each source held out twice; md-failure (3 frames) cannot spare one.
        held_out = {"liquid": 8, "dimer": 4, "monomer": 6}
        assert sources_per_subset(frames, split) == {
            "train": {"liquid": 24, "dimer": 12, "monomer": 18, "md-failure": 3}, "val": held_out, "test": held_out}
        for name, indices in split.items():  # snapshots spanning two sources still stay whole
            snapshots = {frames[k].info.get("snapshot") for k in indices} - {None}
            others = {frames[k].info.get("snapshot") for other, rest in split.items() if other != name for k in rest}
            assert not snapshots & others
        assert split_frames(without_monomer_source, 0.2, 0.2, seed, ["snapshot"], stratify_by="source") == split


def test_a_stratum_of_one_group_stays_in_training():
    frames = sourced_frames()
    md_failure = {90, 91, 92}
    unstratified = [split_frames(frames, 0.2, 0.2, seed=seed, group_by=["snapshot"]) for seed in range(10)]
    assert any(md_failure <= set(split["test"]) for split in unstratified)  # what stratification prevents
    for seed in range(10):
        for fraction in (0.2, 0.45):  # floor(0.45 x 3 frames) = 1, still less than the group
            split = split_frames(frames, fraction, fraction, seed=seed, group_by=["snapshot"], stratify_by="source")
            assert md_failure <= set(split["train"])


def test_unstratified_split_is_unchanged():
    """The split of the code before stratify_by existed, so split.json files of earlier runs reproduce."""
    frames = sourced_frames()
    expected = {
        "val": [16, 17, 18, 19, 32, 33, 34, 35, 44, 48, 54, 58, 60, 65, 69, 70, 71, 86, 89],
        "test": [4, 5, 6, 7, 12, 13, 14, 15, 36, 37, 38, 39, 41, 43, 49, 51, 53, 59, 61, 62, 64, 82, 84],
    }
    expected["train"] = sorted(set(range(93)) - set(expected["val"]) - set(expected["test"]))
    assert split_frames(frames, 0.2, 0.2, seed=0, group_by=["snapshot"]) == expected
    assert split_frames(frames, 0.2, 0.2, seed=0, group_by=["snapshot"], stratify_by=None) == expected
    expected = {"val": [7, 11, 16, 24, 28, 40, 48, 63, 67, 70],
                "test": [6, 9, 12, 21, 26, 36, 37, 42, 46, 49, 56, 58, 64, 79]}  # ungrouped: one group per frame
    expected["train"] = sorted(set(range(93)) - set(expected["val"]) - set(expected["test"]))
    assert split_frames(frames, 0.1, 0.15, seed=1, group_by=[]) == expected


def test_stratified_split_does_not_depend_on_file_order():
    frames = sourced_frames()
    shuffled = [frames[k] for k in np.random.default_rng(7).permutation(len(frames))]
    for group_by in (["snapshot"], []):
        ids = [{name: {frame_id(ordered[k]) for k in indices}
                for name, indices in split_frames(ordered, 0.2, 0.2, 3, group_by, stratify_by="source").items()}
               for ordered in (frames, shuffled, frames[::-1])]
        assert ids[0] == ids[1] == ids[2]


def test_extended_split_keeps_the_recorded_frames_and_splits_the_new_ones():
    frames = sourced_frames()
    frames += [Atoms("H", positions=[[0.5 * (93 + k), 0.0, 0.0]], info={"source": "active-learning", "snapshot": 200 + k})
               for k in range(20)]  # 20 new groups of a new source
    frames.append(Atoms("H", positions=[[0.0, 1.0, 0.0]], info={"source": "active-learning", "snapshot": 3}))  # old group
    for atoms in frames:
        atoms.info["frame_id"] = frame_id(atoms)
    old = frames[:90]  # liquid, dimer, monomer
    recorded = {name: [old[k].info["frame_id"] for k in indices]
                for name, indices in split_frames(old, 0.2, 0.2, 0, ["snapshot"], stratify_by="source").items()}
    rule = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 5, "group_by": ["snapshot"], "stratify_by": "source"}
    split = extend_split(frames, recorded, **rule)
    subset = {frames[k].info["frame_id"]: name for name, indices in split.items() for k in indices}
    assert len(subset) == len(frames)
    assert all(subset[frame] == name for name, ids in recorded.items() for frame in ids)
    assert subset[frames[-1].info["frame_id"]] == subset[frames[12].info["frame_id"]]  # joins snapshot 3's subset
    new = frames[90:113]  # md-failure (3) and the 20 new groups, split among themselves
    assert sources_per_subset(new, {name: [k for k, atoms in enumerate(new) if subset[atoms.info["frame_id"]] == name]
                                    for name in split}) == {
        "train": {"md-failure": 3, "active-learning": 12}, "val": {"active-learning": 4}, "test": {"active-learning": 4}}
    with pytest.raises(ValueError, match="not in the data"):
        extend_split(frames[1:], recorded, **rule)
    with pytest.raises(ValueError, match="needs 'train', 'val' and 'test'"):
        extend_split(frames, {"seed": 0, "train": recorded["train"]}, **rule)  # not a split.json


def test_training_keeps_the_split_it_is_given(data_files, tmp_path):
    first = make_config(data_files, tmp_path / "first")
    train(first, stop_after_epochs=1)
    recorded = json.loads((tmp_path / "first" / "split.json").read_text())
    again = make_config(data_files, tmp_path / "again", data__split_seed=5,
                        data__split_from=str(tmp_path / "first" / "split.json"))
    train(again, stop_after_epochs=1)
    kept = json.loads((tmp_path / "again" / "split.json").read_text())
    assert {name: kept[name] for name in ("train", "val", "test")} == {
        name: recorded[name] for name in ("train", "val", "test")}
    frames = load_frames(data_files)
    assert split_frames(frames, 0.25, 0.25, 5, ["temperature_K", "snapshot"]) != split_frames(
        frames, 0.25, 0.25, 0, ["temperature_K", "snapshot"])  # seed 5 alone would have split otherwise


def test_split_json_and_config_record_stratify_by(data_files, tmp_path):
    """train passes data.stratify_by to split_frames and records it; runs from before it resume."""
    config = make_config(data_files, tmp_path / "run", data__stratify_by="n_waters")
    train(config, stop_after_epochs=1)
    frames = load_frames(data_files)
    expected = split_frames(frames, 0.25, 0.25, 0, ["temperature_K", "snapshot"], stratify_by="n_waters")
    split = split_frames(frames, 0.25, 0.25, 0, ["temperature_K", "snapshot"])
    assert expected != split  # so the recorded split shows that stratify_by reached split_frames
    recorded = json.loads((tmp_path / "run" / "split.json").read_text())
    assert recorded["stratify_by"] == "n_waters"
    assert {name: recorded[name] for name in expected} == {
        name: [frames[k].info["frame_id"] for k in indices] for name, indices in expected.items()}
    assert load_config(tmp_path / "run" / "config.yaml").data.stratify_by == "n_waters"
    assert train(config, resume=True)["finished"]

    old = make_config(data_files, tmp_path / "old")  # no stratify_by: split.json written before it had the key
    (tmp_path / "old").mkdir()
    train_module.record_split(tmp_path / "old", frames, split, old, resume=False)
    recorded = json.loads((tmp_path / "old" / "split.json").read_text())
    assert recorded.pop("stratify_by") is None
    (tmp_path / "old" / "split.json").write_text(json.dumps(recorded))
    train_module.record_split(tmp_path / "old", frames, split, old, resume=True)  # no error


def test_training_reduces_loss_fits_references_and_exports(data_files, tmp_path):
    run_dir = tmp_path / "run"
    config = make_config(data_files, run_dir, epochs=10, patience=100)
    summary = train(config)
    log = read_log(run_dir)
    assert [line["epoch"] for line in log] == list(range(1, 11))
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"], [line["train_loss"] for line in log]
    assert log[-1]["val_loss"] < log[0]["val_loss"]

    # The exported model carries the least-squares reference energies of the training split only.
    frames = {atoms.info["frame_id"]: atoms for atoms in load_frames(data_files)}
    train_frames = [frames[i] for i in json.loads((run_dir / "split.json").read_text())["train"]]
    model = load_model(summary["model"])
    counts = element_counts(train_frames, model.config.species)
    expected, _ = fit_reference_energies(counts, np.array([frame_labels(atoms)[0] for atoms in train_frames]))
    np.testing.assert_allclose(model.reference_energy.numpy(), expected, rtol=1e-6)

    results = json.loads((run_dir / "test_metrics.json").read_text())
    assert results["force_mode"] == "conservative"
    per_size = results["test"]["per_cluster_size"]
    assert set(per_size) <= {"1 waters", "2 waters", "3 waters"} and per_size
    assert sum(m["n_frames"] for m in per_size.values()) == results["test"]["overall"]["n_frames"] > 0
    description = json.loads(Path(summary["model"]).with_suffix(".json").read_text())
    assert description["metadata"]["training_data"]["split_sizes"] == {k: len(v) for k, v in json.loads(
        (run_dir / "split.json").read_text()).items() if k in ("train", "val", "test")}


def test_resume_continues_exactly(data_files, tmp_path):
    """2 epochs straight == 1 epoch, stop, resume; across the direct -> conservative switch."""
    straight = make_config(data_files, tmp_path / "straight", direct_force_epochs=1)
    train(straight)
    interrupted = make_config(data_files, tmp_path / "interrupted", direct_force_epochs=1)
    assert train(interrupted, stop_after_epochs=1)["finished"] is False
    assert len(read_log(tmp_path / "interrupted")) == 1
    with pytest.raises(FileExistsError):
        train(interrupted)  # a fresh start must not overwrite a run
    train(interrupted, resume=True)

    assert [line["mode"] for line in read_log(tmp_path / "straight")] == ["direct", "conservative"]
    assert without_times(read_log(tmp_path / "straight")) == without_times(read_log(tmp_path / "interrupted"))
    for name in ("checkpoint_latest.pt",):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "interrupted" / name, weights_only=True)
        for part in ("model", "ema"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    exported = [load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "interrupted")]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_fine_tuning_starts_from_the_trained_model(data_files, tmp_path, monkeypatch):
    """model.init_from: the first step starts from the given model's weights, reference energies and energy
    scale, training moves them, and the export records where it began."""
    first = train(make_config(data_files, tmp_path / "first", epochs=3, patience=100))
    start = load_model(first["model"])
    real_train_epoch, weights_at_first_epoch = train_module.train_epoch, []

    def train_epoch(model, *args):
        if not weights_at_first_epoch:
            weights_at_first_epoch.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_train_epoch(model, *args)

    monkeypatch.setattr(train_module, "train_epoch", train_epoch)
    tuned = train(make_config(data_files, tmp_path / "tuned", epochs=2, optimizer__lr=1e-3, model={"init_from": first["model"]}))
    for name, value in start.state_dict().items():
        assert torch.equal(weights_at_first_epoch[0][name], value), name
    tuned_model = load_model(tuned["model"])
    assert tuned_model.config == start.config
    torch.testing.assert_close(tuned_model.reference_energy, start.reference_energy)
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in tuned_model.state_dict().items())
    training_data = json.loads(Path(tuned["model"]).with_suffix(".json").read_text())["metadata"]["training_data"]
    first_description = json.loads(Path(first["model"]).with_suffix(".json").read_text())
    assert training_data["init_from"]["weights_sha256"] == first_description["weights_sha256"]
    assert training_data["reference_fit_rank"] is None


def test_fine_tuning_resumes_exactly(data_files, tmp_path):
    """An interrupted fine-tuning run resumed from its checkpoint matches one run straight through."""
    start = train(make_config(data_files, tmp_path / "start", epochs=1))["model"]
    straight = make_config(data_files, tmp_path / "straight", model={"init_from": start})
    train(straight)
    interrupted = make_config(data_files, tmp_path / "interrupted", model={"init_from": start})
    assert train(interrupted, stop_after_epochs=1)["finished"] is False
    train(interrupted, resume=True)
    assert without_times(read_log(tmp_path / "straight")) == without_times(read_log(tmp_path / "interrupted"))


def test_fine_tuning_refuses_architecture_overrides(data_files, tmp_path):
    with pytest.raises(ValueError, match="model.init_from takes the architecture from .*remove model.overrides"):
        make_config(data_files, tmp_path / "run", model={"init_from": "some.safetensors", "overrides": TINY_MODEL})


def test_time_budget_stops_between_epochs_and_still_exports(data_files, tmp_path):
    """max_minutes: stop before an epoch would overrun the budget, then test and export as usual."""
    config = make_config(data_files, tmp_path / "timed", epochs=50, max_minutes=1e-9)
    summary = train(config)
    assert summary["finished"] and summary["epochs_done"] == 1
    assert len(read_log(tmp_path / "timed")) == 1 and Path(summary["model"]).exists()
    assert json.loads(Path(summary["model"]).with_suffix(".json").read_text())["metadata"]["stopped_early"]


def test_nan_loss_stops_with_a_clear_error(data_files, tmp_path, capsys):
    config = make_config(data_files, tmp_path / "diverge", epochs=1, optimizer__lr=1e30, optimizer__max_grad_norm=None)
    with pytest.raises(TrainingDiverged, match="non-finite training loss at epoch 1.*Divergence retries used: 2 of 2"):
        train(config)  # the default 2 retries from the initial state, at lr scales 1/2 and 1/4, diverge as well
    assert not (tmp_path / "diverge" / "checkpoint_latest.pt").exists()
    # The command line reports it and exits with status 1 (config from YAML plus overrides).
    config_path = tmp_path / "diverge.yaml"
    config_path.write_text(json.dumps({**config.to_dict(), "run_dir": str(tmp_path / "diverge_cli")}))
    assert cli_main(["train", str(config_path), "--override", "optimizer.lr=1e30"]) == 1
    assert "non-finite training loss" in capsys.readouterr().err


def test_divergence_in_the_first_epoch_redoes_it_from_the_initial_state_at_a_lower_lr(data_files, tmp_path, monkeypatch, capsys):
    """Epoch 1 diverges once after a full epoch of updates: the rollback to the initial state and the halved
    lr make the run identical to one started with half the lr."""
    attempts = blow_up(monkeypatch, epoch=0, times=1)
    summary = train(make_config(data_files, tmp_path / "recovered"))
    assert attempts == [0, 0, 1]
    assert "epoch 1/2 diverged: retry 1 of 2 from the state after epoch 0 with lr scale 0.5" in capsys.readouterr().out
    assert summary["finished"] and (summary["divergence_recoveries"], summary["lr_scale"]) == (1, 0.5)
    description = json.loads(Path(summary["model"]).with_suffix(".json").read_text())
    assert description["metadata"]["divergence_recoveries"] == 1

    monkeypatch.undo()
    train(make_config(data_files, tmp_path / "half_lr", optimizer__lr=5e-3))
    assert without_times(read_log(tmp_path / "recovered")) == without_times(read_log(tmp_path / "half_lr"))
    a, b = (torch.load(tmp_path / run / "checkpoint_latest.pt", weights_only=True) for run in ("recovered", "half_lr"))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert (a["lr_scale"], a["divergence_recoveries"]) == (0.5, 1)


def test_recovery_from_the_latest_checkpoint_keeps_the_lower_lr_across_resume(data_files, tmp_path, monkeypatch):
    """Epoch 2 diverges once: it is redone from checkpoint_latest.pt, and the rest of the run, resumed or
    not, uses half the scheduled lr."""
    config = make_config(data_files, tmp_path / "straight", epochs=3)
    attempts = blow_up(monkeypatch, epoch=1, times=1)
    summary = train(config)
    assert attempts == [0, 1, 1, 2]
    assert (summary["divergence_recoveries"], summary["lr_scale"]) == (1, 0.5)
    log = read_log(tmp_path / "straight")
    assert [line["epoch"] for line in log] == [1, 2, 3] and all(math.isfinite(line["val_loss"]) for line in log)
    steps = math.ceil(len(json.loads((tmp_path / "straight" / "split.json").read_text())["train"]) / 2)
    schedule = warmup_cosine(3 * steps, steps, config.optimizer.min_lr_ratio)
    expected = [1e-2 * schedule(0), 0.5e-2 * schedule(steps), 0.5e-2 * schedule(2 * steps)]
    assert [line["lr"] for line in log] == pytest.approx(expected)

    interrupted = make_config(data_files, tmp_path / "interrupted", epochs=3)
    attempts = blow_up(monkeypatch, epoch=1, times=1)
    stopped = train(interrupted, stop_after_epochs=2)
    assert attempts == [0, 1, 1] and not stopped["finished"]
    assert (stopped["divergence_recoveries"], stopped["lr_scale"]) == (1, 0.5)
    resumed = train(interrupted, resume=True)
    assert attempts == [0, 1, 1, 2] and resumed["finished"]
    assert (resumed["divergence_recoveries"], resumed["lr_scale"]) == (1, 0.5)
    assert without_times(read_log(tmp_path / "interrupted")) == without_times(log)


@pytest.mark.parametrize("retries", [0, 2])
def test_divergence_beyond_the_retries_stops_with_a_clear_error(data_files, tmp_path, monkeypatch, retries):
    config = make_config(data_files, tmp_path / "diverge", optimizer__divergence_retries=retries)
    attempts = blow_up(monkeypatch, epoch=1)
    message = f"non-finite training loss at epoch 2, batch 1 .*Divergence retries used: {retries} of {retries}"
    with pytest.raises(TrainingDiverged, match=message):
        train(config)
    assert attempts == [0] + [1] * (retries + 1)
    assert [line["epoch"] for line in read_log(tmp_path / "diverge")] == [1]
    latest = torch.load(tmp_path / "diverge" / "checkpoint_latest.pt", weights_only=True)
    assert (latest["epoch"], latest["lr_scale"], latest["divergence_recoveries"]) == (1, 1.0, 0)


def test_divergence_settings_are_checked(data_files, tmp_path):
    config = make_config(data_files, tmp_path)
    assert (config.optimizer.divergence_retries, config.optimizer.divergence_lr_factor) == (2, 0.5)
    assert make_config(data_files, tmp_path, optimizer__divergence_lr_factor="2.5e-1").optimizer.divergence_lr_factor == 0.25
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="optimizer.divergence_retries must be an integer >= 0"):
            make_config(data_files, tmp_path, optimizer__divergence_retries=bad)
    for bad in (0, 1, 2.0):
        with pytest.raises(ValueError, match=r"optimizer.divergence_lr_factor must be in \(0, 1\)"):
            make_config(data_files, tmp_path, optimizer__divergence_lr_factor=bad)


def test_runs_from_before_divergence_retries_resume(data_files, tmp_path):
    """A run whose config.yaml and checkpoint predate the divergence settings continues with their defaults."""
    config = make_config(data_files, tmp_path / "old")
    train(config, stop_after_epochs=1)
    saved = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    del saved["optimizer"]["divergence_retries"], saved["optimizer"]["divergence_lr_factor"]
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    latest = torch.load(tmp_path / "old" / "checkpoint_latest.pt", weights_only=True)
    del latest["lr_scale"], latest["divergence_recoveries"]
    torch.save(latest, tmp_path / "old" / "checkpoint_latest.pt")
    summary = train(config, resume=True)
    assert summary["finished"] and (summary["divergence_recoveries"], summary["lr_scale"]) == (0, 1.0)


def test_example_config_is_valid():
    config = load_config(EXAMPLE)
    assert config.model.preset == "water_small" and config.model.overrides["cutoff"] == 5.0
    assert 0 < config.direct_force_epochs < config.epochs  # conservative fine-tuning at the end
    assert config.data.test_fraction > 0
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(EXAMPLE, ["optimizer.learning_rate=1e-3"])


def test_conservative_phase_can_weight_energy_differently():
    loss = LossConfig(energy_weight=10.0, force_weight=1.0, conservative_energy_weight=1000.0)
    energy_error, force_error = torch.full((4,), 0.01), torch.zeros(5, 3)
    direct, _, _ = loss_terms(energy_error, force_error, loss.for_mode("direct"))
    conservative, _, _ = loss_terms(energy_error, force_error, loss.for_mode("conservative"))
    assert direct.item() == pytest.approx(10.0 * 1e-4)
    assert conservative.item() == pytest.approx(1000.0 * 1e-4)
    assert LossConfig(energy_weight=10.0).for_mode("conservative").energy_weight == 10.0


def test_training_learns_the_corrected_labels(data_files, tmp_path):
    correction = {"amplitude_eV": 1.0, "decay_per_A": 0.5, "switch_on_A": 3.0, "cutoff_A": 4.0}
    config = make_config(data_files, tmp_path / "run", epochs=1, data__label_correction=correction)
    model = load_model(train(config)["model"])
    # the reference energies are fitted on the corrected labels of the training split
    frames = {atoms.info["frame_id"]: atoms for atoms in correct_labels(load_frames(data_files), PairCorrection.from_dict(correction))}
    train_frames = [frames[i] for i in json.loads((tmp_path / "run" / "split.json").read_text())["train"]]
    assert any(atoms.info["label_correction_eV"] > 0.01 for atoms in train_frames)
    counts = element_counts(train_frames, model.config.species)
    expected, _ = fit_reference_energies(counts, np.array([frame_labels(atoms)[0] for atoms in train_frames]))
    np.testing.assert_allclose(model.reference_energy.numpy(), expected, rtol=1e-6)

    with pytest.raises(ValueError, match="unknown keys in the label correction"):
        make_config(data_files, tmp_path / "other", data__label_correction={"amplitude_eV": 1.0, "decay": 0.5})
