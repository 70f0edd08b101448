"""Safe model checkpoints: weights in safetensors, architecture and metadata in JSON.

A checkpoint is two files with one stem:

    <stem>.safetensors   the state_dict (no pickle: loading cannot run code)
    <stem>.json          {"format": "e2former-calc-checkpoint", "format_version": 1,
                          "architecture": E2FormerConfig.to_dict(), "species": [Z...],
                          "cutoff": Å, "reference_energies": {"H": eV, ...}, "units": {...},
                          "dtype": "float32", "weights_sha256": hex digest of the weights file,
                          "metadata": {training data summary, metrics, ... as passed to save_model}}

Shipped models live in `e2former_calc/pretrained/` and are listed by name in its
`registry.json` ({name: {"checkpoint": stem relative to that folder, "description": ...}}).
`load_model` takes a registered name or a path (with or without the extension) and refuses
pickle files (.pt, .pth, .pkl, .ckpt, or anything that starts like a pickle or zip archive).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from ase.data import chemical_symbols
from safetensors.torch import load_file, save_file

FORMAT_NAME = "e2former-calc-checkpoint"
FORMAT_VERSION = 1
UNITS = {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"}
REQUIRED_KEYS = (
    "format_version", "architecture", "species", "cutoff", "reference_energies", "units",
    "dtype", "weights_sha256",
)
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch.float32 or torch.float64 from a name or a torch dtype; ValueError for others."""
    for name, torch_dtype in DTYPES.items():
        if dtype == name or dtype == torch_dtype:
            return torch_dtype
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device from "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:k"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<k>', got {device!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was requested but CUDA is not available in this PyTorch "
                "(torch.cuda.is_available() is False); use device='cpu' or 'auto'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<k>', got {str(device)!r}")
    return device


def registered_models() -> dict[str, dict]:
    """{name: {"checkpoint": stem relative to e2former_calc/pretrained, "description": str}}."""
    return json.loads((PRETRAINED_DIR / "registry.json").read_text())


def save_model(model, path: str | Path, metadata: dict | None = None) -> tuple[Path, Path]:
    """Write `<path>.safetensors` and `<path>.json` for an E2FormerV2; returns both paths.

    `metadata` (JSON-able: training data summary, metrics, level of theory, ...) is stored
    as is under "metadata". A ".json" or ".safetensors" suffix on `path` is ignored.
    """
    weights_path, json_path = _checkpoint_files(Path(path))
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    # Cloning breaks shared storage (tied weights), which safetensors refuses to write.
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, str(weights_path))
    config = model.config
    reference = model.reference_energy.detach().cpu().tolist()
    description = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": config.to_dict(),
        "species": list(config.species),
        "cutoff": config.cutoff,
        "reference_energies": {chemical_symbols[z]: e for z, e in zip(config.species, reference)},
        "units": UNITS,
        "dtype": str(model.reference_energy.dtype).removeprefix("torch."),
        "weights_sha256": _sha256(weights_path),
        "metadata": metadata or {},
    }
    json_path.write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n")
    return weights_path, json_path


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
):
    """An E2FormerV2 in eval mode from a registered name or a checkpoint path.

    `dtype` None keeps the stored dtype. Raises ValueError for pickle files, unknown names,
    a weights file whose sha256 differs from the recorded one, and metadata or tensor shapes
    that do not match; FileNotFoundError when the files are missing.
    """
    from e2former_calc.models.e2former import E2FormerConfig, E2FormerV2

    device = resolve_device(device)
    weights_path, json_path = _locate(name_or_path)
    description = read_description(json_path)
    if _sha256(weights_path) != description["weights_sha256"]:
        raise ValueError(
            f"{weights_path} does not match the sha256 recorded in {json_path}: the weights file "
            "is corrupted or belongs to another checkpoint"
        )
    config = E2FormerConfig.from_dict(description["architecture"])
    _check_summary(description, config, json_path)
    model = E2FormerV2(config)
    state = load_file(str(weights_path))
    _check_tensors(state, model.state_dict(), weights_path)
    model.load_state_dict(state)
    stored = resolve_dtype(description["dtype"])
    return model.to(device=device, dtype=stored if dtype is None else resolve_dtype(dtype)).eval()


def model_description(name_or_path: str | Path) -> dict:
    """The JSON description (architecture, metadata, ...) of a registered name or checkpoint path."""
    return read_description(_locate(name_or_path)[1])


def read_description(json_path: Path) -> dict:
    """The checkpoint's JSON, checked for format, version, required keys and units."""
    try:
        description = json.loads(Path(json_path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path} is not valid JSON ({error})") from error
    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        raise ValueError(f"{json_path} is not an e2former-calc checkpoint description (no \"format\": \"{FORMAT_NAME}\")")
    missing = [key for key in REQUIRED_KEYS if key not in description]
    if missing:
        raise ValueError(f"{json_path} lacks the required keys {missing}")
    if description["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has checkpoint format version {description['format_version']!r}; this "
            f"e2former-calc reads version {FORMAT_VERSION} (update e2former-calc or re-save the model)"
        )
    if description["units"] != UNITS:
        raise ValueError(f"{json_path} declares units {description['units']}, expected {UNITS}")
    return description


def _locate(name_or_path: str | Path) -> tuple[Path, Path]:
    """(weights, json) paths of a registered name or a path; refuses pickles."""
    registry = registered_models()
    if isinstance(name_or_path, str) and name_or_path in registry:
        weights_path, json_path = _checkpoint_files(PRETRAINED_DIR / registry[name_or_path]["checkpoint"])
        if not (weights_path.is_file() and json_path.is_file()):
            raise FileNotFoundError(
                f"the registered model {name_or_path!r} is not installed: {weights_path.name} and "
                f"{json_path.name} are expected in {PRETRAINED_DIR}"
            )
        return weights_path, json_path
    path = Path(name_or_path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(_pickle_refusal(path))
    if path.is_file() and path.suffix not in (".json", ".safetensors"):
        _refuse_if_pickle(path)
    weights_path, json_path = _checkpoint_files(path)
    if not (weights_path.is_file() and json_path.is_file()):
        missing = [str(p) for p in (weights_path, json_path) if not p.is_file()]
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a registered model name (known: {sorted(registry)}) "
            f"nor a checkpoint: missing {missing}"
        )
    _refuse_if_pickle(weights_path)
    return weights_path, json_path


def _checkpoint_files(path: Path) -> tuple[Path, Path]:
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _refuse_if_pickle(path: Path) -> None:
    with open(path, "rb") as handle:
        start = handle.read(2)
    is_zip = start == b"PK"
    is_pickle = len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5
    if is_zip or is_pickle:
        raise ValueError(_pickle_refusal(path))


def _pickle_refusal(path: Path) -> str:
    return (
        f"{path} is (or is named like) a pickle/zip checkpoint such as torch.save writes; loading "
        "one can execute arbitrary code, so e2former-calc refuses it. Load it yourself only if you "
        "trust its source and convert it with e2former_calc.save_model, which writes safetensors + JSON."
    )


def _check_summary(description: dict, config, json_path: Path) -> None:
    """The human-readable species and cutoff must agree with the architecture."""
    if list(description["species"]) != list(config.species) or float(description["cutoff"]) != float(config.cutoff):
        raise ValueError(
            f"{json_path}: species {description['species']} / cutoff {description['cutoff']} disagree "
            f"with the architecture (species {list(config.species)}, cutoff {config.cutoff})"
        )


def _check_tensors(state: dict, expected: dict, weights_path: Path) -> None:
    """The stored tensors must be exactly the architecture's, with the same shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{name}: stored {tuple(state[name].shape)}, architecture {tuple(expected[name].shape)}"
        for name in sorted(set(state) & set(expected))
        if state[name].shape != expected[name].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"the tensors in {weights_path} do not match the architecture in its JSON: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(wrong_shape)} with wrong shapes {wrong_shape[:5]} (at most 5 of each shown)"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
