"""Safetensors + JSON checkpoints: round trip, registry, and refusal of bad or unsafe files."""

import json
import pickle

import numpy as np
import pytest
import torch
from ase.build import molecule

from e2former_calc import checkpoint
from e2former_calc.checkpoint import load_model, read_description, save_model
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2
from e2former_calc.neighbors import build_graph


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = E2FormerConfig(
        species=(1, 8), channels=16, num_blocks=1, num_heads=4, head_dim=4, cutoff=3.5,
        num_radial=6, edge_hidden=8, **overrides,
    )
    model = E2FormerV2(config).to(torch.float32)
    model.reference_energy.copy_(torch.tensor([-13.6, -2041.8]))
    return model


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    metadata = {"training_data": {"frames": 12, "method": "revPBE-D3(BJ)/def2-TZVP"}, "metrics": {"force_mae": 0.05}}
    save_model(model, tmp_path / "water", metadata=metadata)
    return model, tmp_path / "water", metadata


def outputs(model):
    graph = build_graph([molecule("H2O"), molecule("H2O2")], model.config.cutoff, torch.float32)
    return {key: value.detach() for key, value in model.eval()(graph, compute_forces=True).items()}


def test_round_trip_is_bit_for_bit(saved):
    model, stem, metadata = saved
    for path in (stem, str(stem) + ".json", stem.with_suffix(".safetensors")):
        loaded = load_model(path)
        assert loaded.config == model.config and not loaded.training
        for key, value in outputs(model).items():
            assert torch.equal(value, outputs(loaded)[key]), key
    description = read_description(stem.with_suffix(".json"))
    assert description["metadata"] == metadata
    assert description["species"] == [1, 8] and description["cutoff"] == 3.5
    assert description["reference_energies"] == pytest.approx({"H": -13.6, "O": -2041.8})
    assert description["units"]["energy"] == "eV" and description["dtype"] == "float32"


def test_load_casts_dtype(saved):
    _, stem, _ = saved
    loaded = load_model(stem, dtype="float64")
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64', got 'float16'"):
        load_model(stem, dtype="float16")


def test_registered_name_resolves_inside_the_package(saved, tmp_path, monkeypatch):
    _, stem, _ = saved
    registry = {"water-test": {"checkpoint": "water", "description": "test"}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setattr(checkpoint, "PRETRAINED_DIR", tmp_path)
    assert load_model("water-test").config.species == (1, 8)
    with pytest.raises(FileNotFoundError, match=r"registered model name \(known: \['water-test'\]\)"):
        load_model("e2former-v9-unknown")


def test_shipped_registry_names_are_listed_for_unknown_names():
    with pytest.raises(FileNotFoundError, match="e2former-v2-water-s"):
        load_model("no-such-model")


def test_pickle_files_are_refused(tmp_path, saved):
    model, stem, _ = saved
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="pickle/zip checkpoint.*arbitrary code"):
        load_model(tmp_path / "model.pt")
    disguised = tmp_path / "model_no_suffix"
    disguised.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="pickle/zip checkpoint"):
        load_model(disguised)
    # A zip (torch.save) written in place of the safetensors file of a valid-looking pair.
    torch.save(model.state_dict(), stem.with_suffix(".safetensors"))
    with pytest.raises(ValueError, match="pickle/zip checkpoint"):
        load_model(stem)


def test_tampered_weights_fail_the_hash(saved):
    _, stem, _ = saved
    weights = stem.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_model(stem)


def edit_json(stem, edit):
    path = stem.with_suffix(".json")
    description = json.loads(path.read_text())
    edit(description)
    path.write_text(json.dumps(description))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("weights_sha256"), r"lacks the required keys \['weights_sha256'\]"),
        (lambda d: d.update(format_version=99), "format version 99; this e2former-calc reads version 1"),
        (lambda d: d.update(format="something-else"), "not an e2former-calc checkpoint"),
        (lambda d: d["units"].update(energy="kcal/mol"), "declares units"),
        (lambda d: d.update(cutoff=6.0), "disagree with the architecture"),
        (lambda d: d["architecture"].update(channels=32, cutoff=3.5), "wrong shapes"),
        (lambda d: d["architecture"].update(use_charge_spin=True), "2 missing"),
        (lambda d: d["architecture"].update(bogus=1), "unknown E2FormerConfig fields"),
    ],
)
def test_metadata_mismatch_is_refused(saved, edit, message):
    _, stem, _ = saved
    edit_json(stem, edit)
    with pytest.raises(ValueError, match=message):
        load_model(stem)


def test_missing_files_are_named(tmp_path, saved):
    _, stem, _ = saved
    stem.with_suffix(".safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"water\.safetensors"):
        load_model(stem)


def test_float64_model_round_trip(tmp_path):
    model = tiny_model(seed=1, use_charge_spin=True).double()
    save_model(model, tmp_path / "charged.json")
    loaded = load_model(tmp_path / "charged")
    assert read_description(tmp_path / "charged.json")["dtype"] == "float64"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert np.isfinite(loaded.reference_energy.numpy()).all()
