"""Molecular-dynamics drivers around ASE's integrators, with restart files and a watchdog.

`run_md` runs NVE (velocity Verlet) or NVT (Nosé–Hoover chain, Bussi stochastic velocity
rescaling, Langevin) on an `Atoms` object that already carries a calculator, and writes to
`output_dir`:

- ``trajectory.extxyz``  frames every `trajectory_interval` steps (extended XYZ: plain text,
  appendable, read by any tool): positions, momenta, energy, the calculator's forces before
  constraints, ``info["step"]`` and ``info["time_fs"]``,
- ``md.log``             one line every `log_interval` steps: step, time (ps), Epot, Ekin,
  Etot (eV, whole system) and T (K); the header records the number of atoms,
- ``restart.npz``        the full state every `restart_interval` steps and at the end:
  positions, momenta and cell at full precision, the step, the thermostat variables ASE
  exposes, the random-number-generator state and the sizes of the trajectory and log files,
- ``last_good_frame.extxyz`` only when the watchdog stops the run.

With ``restart=True`` and an existing ``restart.npz`` the run continues from the saved step up
to `steps` (the total length of the run), after cutting the trajectory and log back to what
they held at that save, so `n` steps, a restart and `n` more give the same trajectory as `2n`
steps in one go: bit for bit when the calculator's results depend on the positions alone
(not, e.g., on a neighbour list kept from earlier calls). `max_seconds` bounds the wall-clock
time of one call: the run then saves its state and returns early (``completed=False``), and
the next call with ``restart=True`` goes on from there; long runs can so be done in chunks.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.md.bussi import Bussi
from ase.md.langevin import Langevin
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.velocitydistribution import Stationary, force_temperature
from ase.md.verlet import VelocityVerlet
from tqdm.auto import tqdm

ENSEMBLES = ("nve", "nose-hoover", "bussi", "langevin")
TRAJECTORY_NAME = "trajectory.extxyz"
LOG_NAME = "md.log"
RESTART_NAME = "restart.npz"
LAST_GOOD_NAME = "last_good_frame.extxyz"
LOG_COLUMNS = ("step", "time_ps", "epot_eV", "ekin_eV", "etot_eV", "temperature_K")


class MDWatchdogError(RuntimeError):
    """The watchdog stopped a run: `reason`, the `step` it happened at, and where the last
    frame that passed the checks was written (`last_good_path`, None if there was none)."""

    def __init__(self, reason: str, step: int, last_good_path: Path | None):
        self.reason = reason
        self.step = step
        self.last_good_path = last_good_path
        where = f"; last good frame written to {last_good_path}" if last_good_path else ""
        super().__init__(f"MD stopped at step {step}: {reason}{where}")


@dataclass(frozen=True)
class Watchdog:
    """Limits checked after every step; crossing one stops the run with `MDWatchdogError`.

    Non-finite energy, forces or positions always stop the run. `max_temperature_K` bounds the
    instantaneous temperature and `max_energy_change_per_atom_eV` bounds |Epot - Epot(step 0)|
    per atom (a change, because absolute energies depend on the model's reference energies).
    """

    max_temperature_K: float = 5000.0
    max_energy_change_per_atom_eV: float = 1.0

    def problem(
        self, atoms: Atoms, energy: float, forces: np.ndarray, reference_energy_per_atom: float
    ) -> str | None:
        """Why `atoms`, whose calculator gave `energy` (eV) and `forces` [n, 3] (eV/Å, before
        constraints), is not a good frame, or None."""
        for name, values in (
            ("potential energy", energy),
            ("forces", forces),
            ("positions", atoms.positions),
            ("momenta", atoms.get_momenta()),
        ):
            if not np.all(np.isfinite(values)):
                return f"non-finite {name} (NaN or inf)"
        temperature = atoms.get_temperature()
        if temperature > self.max_temperature_K:
            return (
                f"temperature {temperature:.4g} K exceeds the limit "
                f"{self.max_temperature_K:.4g} K (runaway)"
            )
        change = energy / len(atoms) - reference_energy_per_atom
        if abs(change) > self.max_energy_change_per_atom_eV:
            return (
                f"potential energy changed by {change:+.4g} eV/atom since step 0, beyond "
                f"±{self.max_energy_change_per_atom_eV:.4g} eV/atom (runaway)"
            )
        return None


@dataclass(frozen=True)
class MDResult:
    """Where a run wrote its output and how far it went: `steps` is the last step done, and
    `completed` says whether that is the requested total (False when `max_seconds` ran out).
    `elapsed_s` is the wall-clock time of this call's steps, output included."""

    trajectory_path: Path
    log_path: Path
    restart_path: Path
    steps: int
    started_from_step: int
    final_temperature_K: float
    completed: bool
    elapsed_s: float


def run_md(
    atoms: Atoms,
    ensemble: str,
    temperature_K: float,
    timestep_fs: float,
    steps: int,
    output_dir: str | os.PathLike,
    seed: int = 0,
    trajectory_interval: int = 10,
    log_interval: int = 10,
    restart_interval: int = 100,
    coupling_time_fs: float = 100.0,
    restart: bool = True,
    progress: bool = True,
    watchdog: Watchdog | None = Watchdog(),
    keep_momenta: bool = False,
    max_seconds: float | None = None,
) -> MDResult:
    """Run `steps` MD steps in total (counting those done before a restart) on `atoms`.

    `atoms` must carry a calculator; its positions and momenta are updated in place.
    `ensemble` is one of ENSEMBLES; `temperature_K` is the thermostat target and, for a fresh
    start, the temperature of the Maxwell–Boltzmann velocities drawn from `seed` (zero total
    momentum, rescaled to exactly `temperature_K`). `coupling_time_fs` is the Nosé–Hoover
    `tdamp`, the Bussi `taut` and the inverse Langevin friction. The same seeded generator
    drives the stochastic thermostats and is saved in the restart file. `keep_momenta=True`
    starts a fresh run from the momenta `atoms` already has (e.g. the end of an equilibration)
    instead. `watchdog=None` turns the checks off. With `max_seconds`, the run stops after the
    first step that ends later than that many seconds (wall clock) after the call began, saves
    its state and returns with ``completed=False``. Raises MDWatchdogError when the watchdog
    fires, ValueError for bad input.
    """
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {ENSEMBLES}")
    if atoms.calc is None:
        raise ValueError("atoms has no calculator; attach one (atoms.calc = ...) before run_md")
    if ensemble == "nose-hoover" and atoms.constraints:
        raise ValueError(
            "ASE's NoseHooverChainNVT ignores constraints (it integrates unconstrained "
            "positions); use ensemble 'bussi' or 'langevin' for constrained (e.g. rigid) systems"
        )
    for name, value in (
        ("timestep_fs", timestep_fs),
        ("trajectory_interval", trajectory_interval),
        ("log_interval", log_interval),
        ("restart_interval", restart_interval),
        ("coupling_time_fs", coupling_time_fs),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trajectory_path = output_dir / TRAJECTORY_NAME
    log_path = output_dir / LOG_NAME
    restart_path = output_dir / RESTART_NAME
    settings = {"ensemble": ensemble, "timestep_fs": float(timestep_fs), "n_atoms": len(atoms)}
    rng = np.random.default_rng(seed)

    if restart and restart_path.exists():
        state = _load_state(restart_path, settings)
        atoms.set_cell(state["cell"])
        atoms.set_positions(state["positions"], apply_constraint=False)
        atoms.set_momenta(state["momenta"], apply_constraint=False)
        rng.bit_generator.state = state["rng_state"]
        start_step = state["step"]
        reference_energy_per_atom = state["reference_energy_per_atom"]
        _truncate(trajectory_path, state["trajectory_bytes"])
        _truncate(log_path, state["log_bytes"])
    else:
        state = None
        start_step = 0
        if not keep_momenta:
            _draw_velocities(atoms, temperature_K, rng)
        reference_energy_per_atom = atoms.get_potential_energy() / len(atoms)
        trajectory_path.write_text("")
        log_path.write_text(
            f"# e2former_calc MD log: ensemble={ensemble} timestep_fs={timestep_fs} "
            f"temperature_K={temperature_K} n_atoms={len(atoms)}\n# {' '.join(LOG_COLUMNS)}\n"
        )

    dynamics = _make_dynamics(atoms, ensemble, temperature_K, timestep_fs, coupling_time_fs, rng)
    if state is not None:
        _restore_thermostat(dynamics, state["thermostat"])
    last_good_path = output_dir / LAST_GOOD_NAME

    started = time.monotonic()
    with open(trajectory_path, "a") as trajectory, open(log_path, "a") as log:

        def save(step: int) -> None:
            trajectory.flush()
            log.flush()
            _save_state(
                restart_path,
                atoms,
                step,
                settings,
                reference_energy_per_atom,
                _thermostat_state(dynamics),
                rng,
                trajectory_bytes=os.fstat(trajectory.fileno()).st_size,
                log_bytes=os.fstat(log.fileno()).st_size,
            )

        def record(step: int, energy: float, forces: np.ndarray) -> None:
            if step % trajectory_interval == 0:
                write(trajectory, _snapshot(atoms, step, timestep_fs, energy, forces), format="extxyz")
            if step % log_interval == 0:
                ekin = atoms.get_kinetic_energy()
                log.write(
                    f"{step:10d} {step * timestep_fs / 1000:12.6f} {energy:18.8f} {ekin:16.8f} "
                    f"{energy + ekin:18.8f} {atoms.get_temperature():12.4f}\n"
                )
            if step % restart_interval == 0 or step == steps:
                save(step)

        energy, forces = _energy_and_forces(atoms)
        _check(watchdog, atoms, energy, forces, start_step, reference_energy_per_atom, None, timestep_fs, last_good_path)
        last_good = _GoodFrame.of(atoms, start_step, energy, forces)
        if start_step == 0:
            record(0, energy, forces)
        step = start_step
        with tqdm(
            total=steps, initial=start_step, disable=not progress, desc=f"MD {ensemble}",
            unit="step",
        ) as bar:
            for step in range(start_step + 1, steps + 1):
                dynamics.step()
                dynamics.nsteps = step
                energy, forces = _energy_and_forces(atoms)
                _check(watchdog, atoms, energy, forces, step, reference_energy_per_atom, last_good,
                       timestep_fs, last_good_path)
                if watchdog is not None:
                    last_good = _GoodFrame.of(atoms, step, energy, forces)
                record(step, energy, forces)
                bar.update()
                if step % log_interval == 0:
                    bar.set_postfix(T=f"{atoms.get_temperature():.0f} K")
                if max_seconds is not None and step < steps and time.monotonic() - started > max_seconds:
                    save(step)
                    break

    return MDResult(
        trajectory_path=trajectory_path,
        log_path=log_path,
        restart_path=restart_path,
        steps=step,
        started_from_step=start_step,
        final_temperature_K=float(atoms.get_temperature()),
        completed=step >= steps,
        elapsed_s=time.monotonic() - started,
    )


def read_md_log(log_path: str | os.PathLike) -> tuple[dict[str, np.ndarray], int]:
    """The columns of an `md.log` as arrays keyed by LOG_COLUMNS, and the number of atoms."""
    with open(log_path) as handle:
        header = handle.readline()
    fields = dict(item.split("=", 1) for item in header.split() if "=" in item)
    if "n_atoms" not in fields:
        raise ValueError(f"{log_path} is not an e2former_calc MD log (no n_atoms in its header)")
    table = np.loadtxt(log_path, comments="#", ndmin=2)
    return {name: table[:, k] for k, name in enumerate(LOG_COLUMNS)}, int(fields["n_atoms"])


def energy_drift_meV_per_atom_ps(log_path: str | os.PathLike) -> float:
    """Slope of a least-squares line through Etot(t) of an MD log, in meV/atom/ps.

    Meaningful for NVE runs (for NVT, Etot is not conserved). Needs at least two log lines.
    """
    columns, n_atoms = read_md_log(log_path)
    if len(columns["step"]) < 2:
        raise ValueError(f"{log_path} has fewer than two log lines; cannot fit a drift")
    slope_eV_per_ps = np.polyfit(columns["time_ps"], columns["etot_eV"], 1)[0]
    return float(slope_eV_per_ps * 1000.0 / n_atoms)


def _draw_velocities(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell–Boltzmann momenta (projected onto the constraints), zero total momentum, then
    rescaled to exactly `temperature_K` over the remaining degrees of freedom."""
    widths = np.sqrt(atoms.get_masses() * units.kB * temperature_K)[:, None]
    atoms.set_momenta(widths * rng.standard_normal((len(atoms), 3)))
    Stationary(atoms, preserve_temperature=False)
    force_temperature(atoms, temperature_K)


def _make_dynamics(atoms, ensemble, temperature_K, timestep_fs, coupling_time_fs, rng):
    timestep = timestep_fs * units.fs
    coupling_time = coupling_time_fs * units.fs
    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep)
    if ensemble == "nose-hoover":
        return NoseHooverChainNVT(atoms, timestep, temperature_K=temperature_K, tdamp=coupling_time)
    if ensemble == "bussi":
        return Bussi(atoms, timestep, temperature_K=temperature_K, taut=coupling_time, rng=rng)
    return Langevin(
        atoms, timestep, temperature_K=temperature_K, friction=1.0 / coupling_time,
        fixcm=False, rng=rng,
    )


def _thermostat_state(dynamics) -> dict[str, np.ndarray]:
    """The internal thermostat variables ASE exposes (Nosé–Hoover chain positions and momenta,
    energy the Bussi thermostat has exchanged); stochastic noise lives in the saved RNG."""
    if isinstance(dynamics, NoseHooverChainNVT):
        return {"eta": dynamics._thermostat._eta, "p_eta": dynamics._thermostat._p_eta}
    if isinstance(dynamics, Bussi):
        return {"transferred_energy": np.asarray(dynamics.transferred_energy)}
    return {}


def _restore_thermostat(dynamics, thermostat: dict[str, np.ndarray]) -> None:
    if isinstance(dynamics, NoseHooverChainNVT):
        dynamics._thermostat._eta = thermostat["eta"].copy()
        dynamics._thermostat._p_eta = thermostat["p_eta"].copy()
    elif isinstance(dynamics, Bussi):
        dynamics.transferred_energy = float(thermostat["transferred_energy"])


def _save_state(
    path: Path,
    atoms: Atoms,
    step: int,
    settings: dict,
    reference_energy_per_atom: float,
    thermostat: dict[str, np.ndarray],
    rng: np.random.Generator,
    trajectory_bytes: int,
    log_bytes: int,
) -> None:
    """Write the restart file atomically: a temporary file, then a rename over the old one."""
    scalars = {
        "step": step,
        "settings": settings,
        "reference_energy_per_atom": reference_energy_per_atom,
        "rng_state": rng.bit_generator.state,
        "trajectory_bytes": trajectory_bytes,
        "log_bytes": log_bytes,
    }
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        np.savez(
            handle,
            positions=atoms.get_positions(),
            momenta=atoms.get_momenta(),
            cell=atoms.cell.array,
            scalars_json=np.array(json.dumps(scalars)),
            **{f"thermostat_{name}": value for name, value in thermostat.items()},
        )
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _load_state(path: Path, settings: dict) -> dict:
    with np.load(path, allow_pickle=False) as archive:
        state = json.loads(str(archive["scalars_json"]))
        for name in ("positions", "momenta", "cell"):
            state[name] = archive[name]
        state["thermostat"] = {
            key.removeprefix("thermostat_"): archive[key]
            for key in archive.files
            if key.startswith("thermostat_")
        }
    if state["settings"] != settings:
        raise ValueError(
            f"{path} was written by a run with {state['settings']}, not {settings}; "
            "use restart=False (or another output directory) to start afresh"
        )
    return state


def _truncate(path: Path, size: int) -> None:
    """Cut `path` back to `size` bytes: drops what a crashed run wrote after its last save."""
    if not path.exists() or path.stat().st_size < size:
        raise ValueError(f"{path} is missing or shorter than the restart file records")
    with open(path, "r+b") as handle:
        handle.truncate(size)


def _energy_and_forces(atoms: Atoms) -> tuple[float, np.ndarray]:
    """The potential energy (eV) and the calculator's forces before constraints [n, 3] (eV/Å)."""
    return atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)


def _snapshot(atoms: Atoms, step: int, timestep_fs: float, energy: float, forces: np.ndarray) -> Atoms:
    """An unconstrained copy of `atoms` holding `energy` and `forces` (the calculator's, before
    constraints), and its step and time in `info`."""
    frame = atoms.copy()
    frame.set_constraint()
    frame.info.update(step=step, time_fs=step * timestep_fs)
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
    return frame


@dataclass(frozen=True)
class _GoodFrame:
    """The state after the last step that passed the watchdog (arrays copied, no Atoms built)."""

    step: int
    positions: np.ndarray
    momenta: np.ndarray
    energy: float
    forces: np.ndarray

    @classmethod
    def of(cls, atoms: Atoms, step: int, energy: float, forces: np.ndarray) -> "_GoodFrame":
        return cls(step, atoms.get_positions(), atoms.get_momenta(), energy, forces)

    def write(self, path: Path, atoms: Atoms, timestep_fs: float) -> None:
        frame = _snapshot(atoms, self.step, timestep_fs, self.energy, self.forces)
        frame.positions = self.positions
        frame.set_momenta(self.momenta)
        write(path, frame, format="extxyz")


def _check(watchdog, atoms, energy, forces, step, reference_energy_per_atom, last_good,
           timestep_fs, last_good_path) -> None:
    """Raise MDWatchdogError if `atoms` fails the watchdog; write `last_good` first."""
    if watchdog is None:
        return
    reason = watchdog.problem(atoms, energy, forces, reference_energy_per_atom)
    if reason is None:
        return
    if last_good is not None:
        last_good.write(last_good_path, atoms, timestep_fs)
    raise MDWatchdogError(reason, step, last_good_path if last_good is not None else None)
