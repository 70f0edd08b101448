"""The shipped water model: loads by name, matches its card, and is a working calculator."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from ase.build import molecule

import e2former_calc
from e2former_calc import E2FormerCalculator, load_model

PRETRAINED = Path(e2former_calc.__file__).parent / "pretrained"
NAME = "e2former-v2-water-s"


def test_shipped_checkpoint_loads_by_name_and_its_sha256_matches_the_card():
    model = load_model(NAME)
    assert model.config.species == (1, 8)
    weights = PRETRAINED / f"{NAME}.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert json.loads((PRETRAINED / f"{NAME}.json").read_text())["weights_sha256"] == digest
    card = (PRETRAINED / "MODEL_CARD.md").read_text()
    assert re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", card).group(1) == digest


def test_the_cards_test_errors_are_the_checkpoints():
    """The card quotes the held-out test errors the checkpoint's metadata recorded (a card left
    stale after a new model ships fails here)."""
    test = json.loads((PRETRAINED / f"{NAME}.json").read_text())["metadata"]["metrics"]["test"]["overall"]
    card = (PRETRAINED / "MODEL_CARD.md").read_text()
    held_out = card[card.index("- Held-out test"):]
    energy = float(re.search(r"energy MAE ([0-9.]+) meV/atom", held_out).group(1))
    force = float(re.search(r"force MAE ([0-9.]+) meV/Å", held_out).group(1))
    assert energy == round(test["energy_mae_meV_per_atom"], 2)
    assert force == round(test["force_mae_meV_per_A"], 1)


def test_shipped_model_restores_a_stretched_oh_bond():
    """A physical sanity check any usable water model passes: stretching O-H by 0.15 Å costs
    energy and the force on that H points back towards its O; no net force on the molecule."""
    water = molecule("H2O")
    stretched = water.copy()
    bond = stretched.positions[1] - stretched.positions[0]
    stretched.positions[1] += 0.15 * bond / np.linalg.norm(bond)
    energies = []
    for atoms in (water, stretched):
        atoms.calc = E2FormerCalculator(model=NAME, device="cpu", dtype="float64")
        energies.append(atoms.get_potential_energy())
    forces = stretched.get_forces()
    assert energies[1] > energies[0] + 0.05
    assert np.dot(forces[1], bond) < 0
    assert abs(forces.sum(axis=0)).max() < 1e-8


def test_the_committed_full_protocol_run_is_the_shipped_models_and_the_card_quotes_it():
    """examples/results/water_nvt_full/ holds the 60 ps liquid run of exactly these weights, complete, and the
    card's liquid check quotes its g_OO numbers (shipping new weights without their run fails here)."""
    run_dir = Path(__file__).parents[1] / "examples" / "results" / "water_nvt_full"
    run = json.loads((run_dir / "run.json").read_text())
    shipped = json.loads((PRETRAINED / f"{NAME}.json").read_text())["weights_sha256"]
    assert run["settings"]["weights_sha256"] == shipped
    assert run["complete"] and run["molecular_integrity"]["frames_with_broken_water"] == 0
    rdf = json.loads((run_dir / "rdf_metrics.json").read_text())
    card = (PRETRAINED / "MODEL_CARD.md").read_text()
    liquid = card[card.index("- Liquid check"):]
    assert float(re.search(r"first peak \*\*([0-9.]+) Å", liquid).group(1)) == round(
        rdf["model"]["first_peak_position_angstrom"], 3)
    assert float(re.search(r"height \*\*([0-9.]+)\*\*", liquid).group(1)) == round(rdf["model"]["first_peak_height"], 2)
    assert float(re.search(r"RMSE over 2.5–8 Å\s+\*\*([0-9.]+)\*\*", liquid).group(1)) == round(rdf["rmse"], 3)
