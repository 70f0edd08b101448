"""Train E2Former-V2 on labelled frames: ``python -m e2former_calc.train CONFIG.yaml [--resume] [--override k=v]``.

The recipe, top to bottom:

    frames = load_frames(data.paths), data.label_correction added to their labels when set
    split by provenance group into train / val / test (seeded),
        each data.stratify_by value (e.g. source) held out in proportion when set
    reference energies e_Z = least squares of E ~ counts @ e on train; energy_scale from the residuals
        (or, with model.init_from, the architecture, weights, e_Z and energy_scale of a trained model)
    for epoch in range(epochs):
        mode = "direct" for the first direct_force_epochs (force head), then "conservative" (F = -dE/dr)
        AdamW steps on  w_E * mean((dE / n_atoms)^2) + w_F * mean(dF^2)   (or Huber), warm-up + cosine lr
        a non-finite loss rolls back to the last good epoch and redoes it with the lr scaled down (below)
        EMA of the weights after every step; validate the EMA model; checkpoint latest (+ best)
        early stopping on the validation loss (conservative phase only)
    test split (never seen before): metrics overall, per cluster size and per source; export the best EMA model

Run directory (``run_dir``):

    config.yaml              the resolved config (checked on --resume)
    split.json               frame ids of each split (checked on --resume)
    metrics.jsonl            one JSON line per epoch
    checkpoint_latest.pt     everything needed to resume exactly (tensors and plain values only), including
                             the lr scale and the number of divergence recoveries so far
    checkpoint_best.pt       EMA weights of the best validation epoch of the current phase
    test_metrics.json        final evaluation of the best EMA model
    model.safetensors/.json  the exported model (e2former_calc.checkpoint.save_model)

Divergence: when the training loss turns NaN or infinite, the epoch's updates are dropped: model, EMA,
optimiser, scheduler and RNG states are reloaded from checkpoint_latest.pt (from an in-memory copy of the
initial state when the first epoch diverges), every learning rate of the rest of the run is multiplied by
optimizer.divergence_lr_factor, and the epoch is redone (on the same batches: see `epoch_order`). This
happens at most optimizer.divergence_retries times per run, resumes included; then, or with 0 retries,
training stops with TrainingDiverged. The summary reports "divergence_recoveries" and the "lr_scale".

Resuming replays exactly: batch order is a function of (seed, epoch), and the model, EMA,
optimiser, scheduler and RNG states and the lr scale are restored. On CUDA, scatter-adds are not bitwise
deterministic, so resumed losses agree only to rounding there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from ase.data import chemical_symbols
from tqdm.auto import tqdm

from e2former_calc.checkpoint import load_model, model_description, resolve_device, resolve_dtype, save_model
from e2former_calc.dataset import (
    PackedFrames,
    element_counts,
    extend_split,
    fit_reference_energies,
    frame_labels,
    load_frames,
    split_frames,
)
from e2former_calc.evaluate import error_metrics, metrics_by_size_and_source, predict_errors, size_label
from e2former_calc.label_correction import PairCorrection, correct_labels
from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2

PRESETS = {"paper": E2FormerConfig, "water_small": E2FormerConfig.water_small}
ENERGY_SCALES = ("residual_rms", "force_rms", "preset")
LOSS_KINDS = ("mse", "huber")


# ------------------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    """Where the frames are and how they are split (train takes what val and test leave)."""

    paths: list[str]  # glob patterns of extxyz files (.gz fine)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    group_by: list[str] = field(default_factory=list)  # info keys whose frames stay in one split
    # info key (e.g. "source") whose every value is held out in proportion; None: no stratification
    stratify_by: str | None = None
    # fields of a label_correction.PairCorrection added to every frame's labels (train, val and test)
    # before anything else sees them; None: the labels as they are
    label_correction: dict | None = None
    # a split.json whose frames keep their subset (new data never moves a test frame into training);
    # frames it does not list are split by the rules above (dataset.extend_split). None: split afresh
    split_from: str | None = None


@dataclass
class ModelSetup:
    """The architecture: a preset of E2FormerConfig plus field overrides, and how energy_scale is set;
    or a trained model to start from (fine-tuning)."""

    preset: str = "water_small"
    overrides: dict = field(default_factory=dict)
    # "residual_rms": RMS per-atom energy left after the reference fit (eV); "force_rms": RMS force
    # component (eV/Å x 1 Å); "preset": keep the preset's / overrides' value.
    energy_scale: str = "residual_rms"
    # registered model name or checkpoint path: start from its architecture, weights, reference energies
    # and energy_scale (preset and energy_scale are then unused, and overrides must stay empty)
    init_from: str | None = None


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last epoch.

    A diverging epoch (non-finite loss) is redone from the last good epoch with all learning rates of
    the rest of the run times `divergence_lr_factor`, at most `divergence_retries` times per run.
    """

    lr: float = 5e-4
    weight_decay: float = 1e-3
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.01
    max_grad_norm: float | None = 10.0  # gradient clipping; None disables it
    divergence_retries: int = 2  # 0: stop at the first divergence
    divergence_lr_factor: float = 0.5  # in (0, 1): the lr scale applied at each retry


@dataclass
class LossConfig:
    """w_E * penalty(energy error per atom, eV) + w_F * penalty(force component error, eV/Å)."""

    energy_weight: float = 1.0
    force_weight: float = 1.0
    kind: str = "mse"  # "mse" or "huber"
    huber_delta: float = 0.01  # eV/atom and eV/Å; only for kind "huber"
    # energy weight of the conservative phase (None: energy_weight). Forces fixed by the direct phase,
    # a heavier energy term in the fine-tuning pulls the energies in, as MACE's second stage does.
    conservative_energy_weight: float | None = None

    def for_mode(self, mode: str) -> "LossConfig":
        """The loss of a training phase ("direct" or "conservative")."""
        if mode == "conservative" and self.conservative_energy_weight is not None:
            return replace(self, energy_weight=self.conservative_energy_weight)
        return self


@dataclass
class TrainConfig:
    data: DataConfig
    model: ModelSetup = field(default_factory=ModelSetup)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run_dir: str = "runs/train"
    epochs: int = 100
    direct_force_epochs: int = 0  # pretraining epochs with the direct force head, then conservative
    batch_size: int = 8  # structures per step
    eval_batch_size: int = 32
    ema_decay: float = 0.99  # 0 makes the EMA model the live model
    patience: int = 20  # epochs without validation improvement before stopping (conservative phase)
    max_minutes: float | None = None  # wall-clock budget of one invocation: stop before an epoch would overrun it
    seed: int = 0  # model initialisation and batch order
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:k"
    dtype: str = "float32"

    SECTIONS = {"data": DataConfig, "model": ModelSetup, "optimizer": OptimizerConfig, "loss": LossConfig}

    def __post_init__(self):
        resolve_dtype(self.dtype)
        if self.model.init_from is not None and self.model.overrides:
            raise ValueError(
                f"model.init_from takes the architecture from {self.model.init_from}; "
                f"remove model.overrides ({sorted(self.model.overrides)})"
            )
        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {self.model.preset!r}")
        if self.model.energy_scale not in ENERGY_SCALES:
            raise ValueError(f"model.energy_scale must be one of {ENERGY_SCALES}, got {self.model.energy_scale!r}")
        if self.loss.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind must be one of {LOSS_KINDS}, got {self.loss.kind!r}")
        if not 0 <= self.direct_force_epochs <= self.epochs:
            raise ValueError(f"direct_force_epochs must be within 0..epochs ({self.epochs}), got {self.direct_force_epochs}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.data.label_correction is not None:
            PairCorrection.from_dict(self.data.label_correction)  # its errors name the bad field
        retries = self.optimizer.divergence_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"optimizer.divergence_retries must be an integer >= 0, got {retries!r}")
        if not 0 < self.optimizer.divergence_lr_factor < 1:
            raise ValueError(f"optimizer.divergence_lr_factor must be in (0, 1), got {self.optimizer.divergence_lr_factor}")

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        """Build from the nested YAML dict; unknown keys are errors (typos must not pass silently)."""
        if "data" not in raw:
            raise ValueError("config needs a 'data' section with at least 'paths'")
        kwargs = _checked_values(cls, raw, "config")
        for name, section in cls.SECTIONS.items():
            kwargs[name] = section(**_checked_values(section, raw.get(name) or {}, name))
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def _checked_values(cls, values: dict, where: str) -> dict:
    """`values` for dataclass `cls`: unknown keys are errors; strings for float fields become floats
    (YAML 1.1 reads 1e-3, without a dot, as a string)."""
    known = {f.name: f.type for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown keys in {where}: {sorted(unknown)}")
    return {
        key: float(value) if isinstance(value, str) and known[key].startswith("float") else value
        for key, value in values.items()
    }


def apply_override(raw: dict, assignment: str) -> None:
    """Set a dotted key of the raw config dict in place: "optimizer.lr=1e-4" (value parsed as YAML)."""
    key, separator, value = assignment.partition("=")
    if not separator:
        raise ValueError(f"an override must look like key.subkey=value, got {assignment!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return TrainConfig.from_dict(raw)


# ------------------------------------------------------------------------------ training pieces
class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing from the failing epoch was saved."""


class ExponentialMovingAverage:
    """A frozen copy of the model whose parameters follow p_ema <- decay p_ema + (1 - decay) p after each step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for shadow, live in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(live, 1.0 - self.decay)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """lr multiplier per optimiser step: linear ramp to 1 over `warmup_steps`, then cosine to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def penalty(error: torch.Tensor, loss: LossConfig) -> torch.Tensor:
    """Mean of error^2 (mse) or of the Huber function of the error."""
    if loss.kind == "mse":
        return error.pow(2).mean()
    return F.huber_loss(error, torch.zeros_like(error), delta=loss.huber_delta)


def loss_terms(energy_error_per_atom: torch.Tensor, force_error: torch.Tensor, loss: LossConfig):
    """(total, energy term, force term) from [B] energy errors per atom (eV) and [N, 3] force errors (eV/Å)."""
    energy_term = loss.energy_weight * penalty(energy_error_per_atom, loss)
    force_term = loss.force_weight * penalty(force_error, loss)
    return energy_term + force_term, energy_term, force_term


def epoch_order(n_frames: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled frame order of one epoch, a function of (seed, epoch) only, so resume replays it."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(n_frames, generator=generator)


def train_epoch(model, ema, optimizer, scheduler, data: PackedFrames, config: TrainConfig, epoch: int, mode: str):
    """One pass over the training frames; returns mean {loss, energy_loss, force_loss} per structure."""
    order = epoch_order(len(data), config.seed, epoch)
    totals = torch.zeros(3, dtype=torch.float64)
    steps = range(0, len(data), config.batch_size)
    with tqdm(steps, desc=f"epoch {epoch + 1}/{config.epochs} [{mode}]", unit="batch", leave=False) as progress:
        for step, start in enumerate(progress):
            batch = data.batch(order[start : start + config.batch_size])
            out = model(batch.graph, compute_forces=True, mode=mode, create_graph=mode == "conservative")
            energy_error = (out["energy"].double() - batch.energy) / batch.n_atoms
            loss, energy_term, force_term = loss_terms(
                energy_error.to(out["forces"].dtype), out["forces"] - batch.forces, config.loss.for_mode(mode)
            )
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"non-finite training loss at epoch {epoch + 1}, batch {step + 1} (energy term "
                    f"{energy_term.item():.4g}, force term {force_term.item():.4g}). Nothing of this epoch "
                    "was saved; checkpoint_latest.pt holds the last good epoch. Lower optimizer.lr, lengthen "
                    "optimizer.warmup_epochs or set optimizer.max_grad_norm, and check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optimizer.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.max_grad_norm)
            optimizer.step()
            scheduler.step()
            ema.update(model)
            size = len(batch.n_atoms)
            totals += size * torch.stack([loss, energy_term, force_term]).detach().double().cpu()
            progress.set_postfix(loss=f"{loss.item():.4g}")
    mean = (totals / len(data)).tolist()
    return {"loss": mean[0], "energy_loss": mean[1], "force_loss": mean[2]}


def training_loss(loss: LossConfig):
    """The training loss as a function of (energy error per atom [S], force error [N, 3]), for error_metrics."""
    return lambda energy_error, force_error: loss_terms(energy_error, force_error.double(), loss)[0]


def evaluate(model, data: PackedFrames, config: TrainConfig, mode: str) -> dict:
    """Loss and MAE/RMSE of `model` on all of `data` (validation)."""
    energy_error, force_error = predict_errors(model, data, config.eval_batch_size, mode)
    return error_metrics(energy_error, force_error, data.n_atoms.cpu(), training_loss(config.loss.for_mode(mode)))


def evaluate_by_size_and_source(model, data: PackedFrames, config: TrainConfig, mode: str) -> dict:
    """{"overall": metrics, "per_cluster_size": {"5 waters": metrics, ...}, "per_source": {...}} (the test split)."""
    energy_error, force_error = predict_errors(model, data, config.eval_batch_size, mode)
    return metrics_by_size_and_source(data.frames, energy_error, force_error, training_loss(config.loss.for_mode(mode)))


# ----------------------------------------------------------------------------- data and model
def labelled_frames(data: DataConfig, root: Path | None = None) -> list:
    """The frames of data.paths (relative to `root` when given) with data.label_correction added to their labels."""
    paths = [str(root / path) if root is not None and not Path(path).is_absolute() else path for path in data.paths]
    frames = load_frames(paths)
    if data.label_correction is not None:
        frames = correct_labels(frames, PairCorrection.from_dict(data.label_correction))
    return frames


def fit_energy_model(frames, model_config: E2FormerConfig, energy_scale: str):
    """Reference energies [K] (eV) by least squares on `frames`, and the model config with energy_scale set.

    Returns (config, reference [K], summary dict for the run's metadata).
    """
    counts, energies = _counts_and_energies(frames, model_config.species)
    reference, rank = fit_reference_energies(counts, energies)
    residual_rms = _residual_rms(counts, energies, reference)
    if energy_scale == "residual_rms":
        scale = residual_rms
    elif energy_scale == "force_rms":
        scale = float(np.sqrt(np.mean(np.concatenate([frame_labels(atoms)[1].ravel() for atoms in frames]) ** 2)))
    else:
        scale = model_config.energy_scale
    if not scale > 0:
        raise ValueError(f"energy_scale '{energy_scale}' came out as {scale}; choose another (model.energy_scale)")
    summary = _energy_summary(model_config.species, reference, rank, residual_rms, scale)
    return replace(model_config, energy_scale=scale), reference, summary


def start_from_model(name_or_path: str, frames) -> tuple[E2FormerV2, dict]:
    """A trained model to fine-tune (weights, reference energies and energy_scale kept), and the summary
    `fit_energy_model` gives, for `frames` under the model's reference energies. Raises ValueError when a
    frame holds an element the model does not know."""
    model = load_model(name_or_path)
    config = model.config
    reference = model.reference_energy.double().numpy()
    counts, energies = _counts_and_energies(frames, config.species)
    summary = _energy_summary(config.species, reference, None, _residual_rms(counts, energies, reference),
                              config.energy_scale)
    summary["init_from"] = {"model": str(name_or_path), "weights_sha256": model_description(name_or_path)["weights_sha256"]}
    return model, summary


def _counts_and_energies(frames, species) -> tuple[np.ndarray, np.ndarray]:
    """Element counts [S, K] (K = len(species)) and labelled total energies [S] (eV) of `frames`."""
    return element_counts(frames, species), np.array([frame_labels(atoms)[0] for atoms in frames])


def _energy_summary(species, reference, rank, residual_rms: float, scale: float) -> dict:
    """The run metadata's account of the energy model: reference energies (eV), the rank of their fit
    (None when taken from a trained model), the residual RMS and energy_scale."""
    return {
        "reference_energies_eV": {chemical_symbols[z]: float(e) for z, e in zip(species, reference)},
        "reference_fit_rank": rank,
        "residual_rms_meV_per_atom": 1000 * residual_rms,
        "energy_scale_eV": scale,
    }


def _residual_rms(counts: np.ndarray, energies: np.ndarray, reference: np.ndarray) -> float:
    """RMS per-atom energy (eV) left after the reference energies: counts [S, K], energies [S], reference [K]."""
    return float(np.sqrt(np.mean(((energies - counts @ reference) / counts.sum(axis=1)) ** 2)))


def data_summary(frames, split: dict[str, list[int]]) -> dict:
    return {
        "files": sorted({atoms.info["file"] for atoms in frames}),
        "n_frames": len(frames),
        "split_sizes": {name: len(indices) for name, indices in split.items()},
        "methods": sorted({str(atoms.info.get("method", "unknown")) for atoms in frames}),
        "cluster_sizes": dict(sorted(Counter(size_label(atoms) for atoms in frames).items())),
    }


def record_split(run_dir: Path, frames, split, config: TrainConfig, resume: bool) -> None:
    """Write split.json (frame ids per split), or on resume check that the data still splits the same way."""
    record = {
        "seed": config.data.split_seed,
        "group_by": config.data.group_by,
        "stratify_by": config.data.stratify_by,
        **{name: [frames[k].info["frame_id"] for k in indices] for name, indices in split.items()},
    }
    path = run_dir / "split.json"
    if resume:
        recorded = {"stratify_by": None, **json.loads(path.read_text())}  # older split.json files lack the key
        if recorded != record:
            raise ValueError(f"the data no longer split as recorded in {path}: the files changed; start a new run_dir")
    else:
        _write_atomically(path, json.dumps(record, indent=1))


def record_config(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    path = run_dir / "config.yaml"
    resolved = _resolved(config)
    if resume:  # parsed again, so that fields added since the run began compare as their defaults
        saved = _resolved(TrainConfig.from_dict(yaml.safe_load(path.read_text())))
        changed = sorted(key for key in resolved.keys() | saved.keys() if resolved.get(key) != saved.get(key))
        if changed:
            raise ValueError(f"--resume needs the config of {path}; these sections differ: {changed}")
    else:
        _write_atomically(path, yaml.safe_dump(resolved, sort_keys=False))


def _resolved(config: TrainConfig) -> dict:
    """The config as plain YAML values (as config.yaml holds it)."""
    return yaml.safe_load(yaml.safe_dump(config.to_dict()))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _save_atomically(state: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------- the driver
def _training_state(state: dict, model, ema, optimizer, scheduler, device) -> dict:
    """What checkpoint_latest.pt holds: `state` (epoch, best epoch, lr scale, ...) and the model, EMA,
    optimiser, scheduler and RNG states."""
    return {
        **state,
        "model": model.state_dict(), "ema": ema.model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _restore_training_state(saved: dict, lr_scale: float, base_lr: float, model, ema, optimizer, scheduler, device) -> None:
    """Load a `_training_state` dict into the model, EMA, optimiser, scheduler and RNGs, then set the
    learning rates to `lr_scale` times the configured ones: the scheduler's base lrs become
    `base_lr * lr_scale`, each param group's current lr that times the schedule at the restored step.

    --resume calls it with the checkpoint's own scale; a divergence rolls back with a smaller one.
    """
    model.load_state_dict(saved["model"])
    ema.model.load_state_dict(saved["ema"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng_cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng_cuda"], device)
    scheduler.base_lrs = [base_lr * lr_scale for _ in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)


def train(config: TrainConfig, resume: bool = False, stop_after_epochs: int | None = None) -> dict:
    """Run (or resume) training as the module docstring describes; returns the run summary.

    `stop_after_epochs` ends this invocation after that many epochs (a planned interruption;
    continue with resume=True). The summary holds "epochs_done", "finished", "divergence_recoveries",
    "lr_scale" (the product of the divergence lr factors applied) and, once finished, "test" metrics
    and the "model" export path.
    """
    run_dir = Path(config.run_dir)
    latest, best = run_dir / "checkpoint_latest.pt", run_dir / "checkpoint_best.pt"
    if resume and not latest.exists():
        raise FileNotFoundError(f"--resume: {latest} does not exist")
    if not resume and latest.exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    record_config(run_dir, config, resume)

    frames = labelled_frames(config.data)
    rule = {"val_fraction": config.data.val_fraction, "test_fraction": config.data.test_fraction,
            "seed": config.data.split_seed, "group_by": config.data.group_by, "stratify_by": config.data.stratify_by}
    if config.data.split_from:
        split = extend_split(frames, json.loads(Path(config.data.split_from).read_text()), **rule)
    else:
        split = split_frames(frames, **rule)
    if not split["train"] or not split["val"]:
        raise ValueError(f"the split has {len(split['train'])} training and {len(split['val'])} validation frames; need both")
    record_split(run_dir, frames, split, config, resume)
    subsets = {name: [frames[k] for k in indices] for name, indices in split.items()}
    torch.manual_seed(config.seed)
    if config.model.init_from is None:
        preset = PRESETS[config.model.preset]().to_dict()
        model_config = E2FormerConfig.from_dict({**preset, **config.model.overrides})
        model_config, reference, energy_summary = fit_energy_model(subsets["train"], model_config, config.model.energy_scale)
        model = E2FormerV2(model_config)
        with torch.no_grad():
            model.reference_energy.copy_(torch.as_tensor(reference))
    else:
        model, energy_summary = start_from_model(config.model.init_from, subsets["train"])
        model_config = model.config
    model = model.to(device=device, dtype=dtype)
    summary = {**data_summary(frames, split), **energy_summary}
    ema = ExponentialMovingAverage(model, config.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay)
    train_data = PackedFrames(subsets["train"], model_config.cutoff, dtype, device)
    val_data = PackedFrames(subsets["val"], model_config.cutoff, dtype, device)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    schedule = warmup_cosine(
        config.epochs * steps_per_epoch,
        max(1, round(config.optimizer.warmup_epochs * steps_per_epoch)),
        config.optimizer.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    state = {"epoch": 0, "best_metric": math.inf, "best_epoch": -1, "stopped_early": False,
             "lr_scale": 1.0, "divergence_recoveries": 0}
    if resume:
        saved = torch.load(latest, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        state = {key: saved.get(key, default) for key, default in state.items()}  # older checkpoints lack some
        _restore_training_state(saved, state["lr_scale"], config.optimizer.lr, model, ema, optimizer, scheduler, device)
        _truncate_log(run_dir / "metrics.jsonl", state["epoch"])
        tqdm.write(f"resuming {run_dir} after epoch {state['epoch']}")
    # A divergence before the first checkpoint rolls back to this copy of the initial state (a resumed
    # run always has a checkpoint).
    initial_state = None if resume else copy.deepcopy(_training_state(state, model, ema, optimizer, scheduler, device))

    origin = "from model.init_from" if "init_from" in summary else f"rank {summary['reference_fit_rank']}"
    tqdm.write(
        f"{summary['split_sizes']} frames; reference energies {summary['reference_energies_eV']} eV "
        f"({origin}); energy_scale {summary['energy_scale_eV']:.4g} eV; device {device}, {config.dtype}"
    )
    epochs_this_run, invocation_start = 0, time.perf_counter()
    while state["epoch"] < config.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        mode = "direct" if epoch < config.direct_force_epochs else "conservative"
        if epoch == config.direct_force_epochs and epoch > 0:  # a new phase: select anew among its epochs
            state["best_metric"], state["best_epoch"] = math.inf, -1
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            train_metrics = train_epoch(model, ema, optimizer, scheduler, train_data, config, epoch, mode)
        except TrainingDiverged as error:
            retries = config.optimizer.divergence_retries
            if state["divergence_recoveries"] >= retries:
                raise TrainingDiverged(
                    f"{error} Divergence retries used: {state['divergence_recoveries']} of {retries} "
                    f"(optimizer.divergence_retries; lr scale {state['lr_scale']:g})."
                ) from error
            state["divergence_recoveries"] += 1
            state["lr_scale"] *= config.optimizer.divergence_lr_factor
            last_good = torch.load(latest, map_location="cpu", weights_only=True) if latest.exists() else initial_state
            _restore_training_state(last_good, state["lr_scale"], config.optimizer.lr, model, ema, optimizer, scheduler, device)
            tqdm.write(
                f"epoch {epoch + 1}/{config.epochs} diverged: retry {state['divergence_recoveries']} of {retries} from "
                f"the state after epoch {epoch} with lr scale {state['lr_scale']:g}"
            )
            continue
        val_metrics = evaluate(ema.model, val_data, config, mode)
        improved = val_metrics["loss"] < state["best_metric"]
        if improved:
            state["best_metric"], state["best_epoch"] = val_metrics["loss"], epoch + 1
            _save_atomically({"epoch": epoch + 1, "mode": mode, "val": val_metrics, "ema": ema.model.state_dict()}, best)
        if mode == "conservative" and epoch + 1 - state["best_epoch"] >= config.patience:
            state["stopped_early"] = True
        state["epoch"] = epoch + 1
        line = {
            "epoch": epoch + 1, "mode": mode, "lr": lr, "time_s": time.perf_counter() - started,
            **{f"train_{key}": value for key, value in train_metrics.items()},
            **{f"val_{key}": value for key, value in val_metrics.items()},
            "best": improved,
        }
        with open(run_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")
        _save_atomically(_training_state(state, model, ema, optimizer, scheduler, device), latest)
        tqdm.write(
            f"epoch {epoch + 1}/{config.epochs} [{mode}] train loss {train_metrics['loss']:.4g} | val "
            f"E {val_metrics['energy_mae_meV_per_atom']:.3g} meV/atom, F {val_metrics['force_mae_meV_per_A']:.4g} meV/Å"
            f"{' (best)' if improved else ''}"
        )
        if state["stopped_early"]:
            tqdm.write(f"early stopping: no validation improvement for {config.patience} epochs (best epoch {state['best_epoch']})")
        epochs_this_run += 1
        if config.max_minutes is not None and state["epoch"] < config.epochs and not state["stopped_early"]:
            elapsed = time.perf_counter() - invocation_start
            if elapsed + elapsed / epochs_this_run > 60 * config.max_minutes:
                state["stopped_early"] = True
                tqdm.write(f"time budget: another epoch would overrun max_minutes={config.max_minutes}; finishing now")
        if stop_after_epochs is not None and epochs_this_run >= stop_after_epochs and state["epoch"] < config.epochs:
            tqdm.write(f"stopping after {epochs_this_run} epochs as asked; continue with --resume")
            return {"epochs_done": state["epoch"], "finished": False, **_recoveries(state)}

    return finish(run_dir, config, ema.model, subsets, summary, state)


def finish(run_dir: Path, config: TrainConfig, model: E2FormerV2, subsets, summary: dict, state: dict) -> dict:
    """Load the best EMA weights, evaluate them once on the held-out test split, export the model."""
    best = torch.load(run_dir / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["ema"])
    mode = best["mode"]
    device, dtype = model.reference_energy.device, model.reference_energy.dtype
    results = {"best_epoch": best["epoch"], "force_mode": mode, "val": best["val"]}
    if subsets["test"]:
        test_data = PackedFrames(subsets["test"], model.config.cutoff, dtype, device)
        results["test"] = evaluate_by_size_and_source(model, test_data, config, mode)
    _write_atomically(run_dir / "test_metrics.json", json.dumps(results, indent=2))
    metadata = {
        "training_data": summary,
        "metrics": results,
        "training_config": config.to_dict(),
        "epochs_done": state["epoch"],
        "stopped_early": state["stopped_early"],
        **_recoveries(state),
    }
    weights_path, _ = save_model(model, run_dir / "model", metadata)
    overall = results.get("test", {}).get("overall")
    if overall:
        tqdm.write(
            f"test ({overall['n_frames']} frames): E MAE {overall['energy_mae_meV_per_atom']:.3g} meV/atom, "
            f"F MAE {overall['force_mae_meV_per_A']:.4g} meV/Å; model written to {weights_path}"
        )
    return {"epochs_done": state["epoch"], "finished": True, **_recoveries(state), **results, "model": str(weights_path)}


def _recoveries(state: dict) -> dict:
    """The run's divergence recoveries and the lr scale they left (summary and model metadata)."""
    return {key: state[key] for key in ("divergence_recoveries", "lr_scale")}


def _truncate_log(path: Path, epochs: int) -> None:
    """Drop log lines of epochs after the checkpoint (written before an interruption, replayed now)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs]
        _write_atomically(path, "".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------------- commands
def run(arguments: argparse.Namespace) -> int:
    """`e2former train` (arguments declared in e2former_calc.cli, which stays torch-free)."""
    config = load_config(arguments.config, arguments.override)
    try:
        train(config, resume=arguments.resume, stop_after_epochs=arguments.stop_after)
    except TrainingDiverged as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from e2former_calc.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
