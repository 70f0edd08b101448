"""Radial distribution functions g_AB(r) from periodic frames, and water's O–O g(r) against
experiment.

`compute_rdf` histograms every A–B distance up to `rmax`, periodic images included (a vesin
neighbour list, so small cells are handled), and normalises each frame by its own volume:

    g_AB(r) = V / (N_A (N_B - δ_AB)) · n_AB(r) / (4π/3 (r_hi^3 - r_lo^3)),

where n_AB counts ordered pairs (i in A, j in B, i ≠ j) in the shell. With N_B - δ_AB an ideal
gas gives g = 1 exactly on average (ASE's `get_rdf` uses N_B, smaller by (N-1)/N for A = B).
`rmax` may not exceed half the shortest perpendicular cell height, beyond which the
finite box distorts the result.

The shipped experimental tables (package data `data/water_rdf/`, citations in their headers
and README) load with `load_experimental_rdf`; `rdf_metrics` and `compare_with_experiment`
give JSON-ready numbers, `plot_rdf` (`plot_rdf_curves` for several) a PNG and `write_rdf_csv` a table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from typing import Iterable

import numpy as np
from ase import Atoms
from tqdm.auto import tqdm

# Water at the temperature of each measurement, for coordination numbers of the tables.
WATER_MASS_G_MOL = 18.01528
AVOGADRO = 6.02214076e23
EXPERIMENTS = {
    "skinner2013": {
        "file": "goo_skinner2013.csv", "temperature_K": 295.15, "density_g_cm3": 0.99777,
    },
    "soper2013": {
        "file": "goo_soper2013.csv", "temperature_K": 298.15, "density_g_cm3": 0.99705,
    },
}
COORDINATION_RADIUS = 3.3  # Å
RMSE_RANGE = (2.5, 8.0)  # Å
FIRST_PEAK_SEARCH = (2.0, 3.6)  # Å: below 2 Å the X-ray table holds Fourier-truncation ripples
FIRST_MINIMUM_SEARCH_WIDTH = 1.5  # Å after the first peak: water's second peak sits at ~4.5 Å


@dataclass(frozen=True)
class RDFResult:
    """g(r) on bins: `r` [nbins] bin centres (Å), `g` [nbins], `bin_edges` [nbins + 1] (Å).

    `partner_density` is the mean number density of B atoms (1/Å^3) over the frames, needed for
    coordination numbers.
    """

    r: np.ndarray
    g: np.ndarray
    bin_edges: np.ndarray
    pair: tuple[str, str]
    n_frames: int
    partner_density: float

    @property
    def rmax(self) -> float:
        return float(self.bin_edges[-1])


@dataclass(frozen=True)
class ExperimentalRDF:
    """A shipped experimental g_OO(r): `r`, `g`, `error` [n] (Å, -, -) and where it came from."""

    name: str
    r: np.ndarray
    g: np.ndarray
    error: np.ndarray
    citation: str
    description: str
    temperature_K: float
    number_density: float  # water molecules (= O atoms) per Å^3


def max_rdf_radius(atoms: Atoms) -> float:
    """Half the shortest perpendicular height of the cell (Å): the largest usable rmax."""
    if not atoms.pbc.all():
        raise ValueError(
            "g(r) needs a cell periodic in all three directions (atoms.pbc is "
            f"{atoms.pbc.tolist()}); the density of a non-periodic system is not defined"
        )
    cell = atoms.cell.array
    volume = abs(np.linalg.det(cell))
    if volume < 1e-8:
        raise ValueError("the cell has zero volume")
    face_areas = [np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    return 0.5 * volume / max(face_areas)


def compute_rdf(
    frames: Atoms | Iterable[Atoms],
    pair: tuple[str, str] = ("O", "O"),
    rmax: float | None = None,
    bin_width: float = 0.05,
    progress: bool = False,
) -> RDFResult:
    """g_AB(r) averaged over `frames` (one Atoms or an iterable, e.g. `ase.io.iread`).

    `rmax` (Å) defaults to, and may not exceed, half the shortest cell height over all frames;
    it is rounded down to a whole number of bins of `bin_width` Å. Raises ValueError for
    non-periodic frames, too large an rmax, an element missing from a frame, or no frames.
    """
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames:
        raise ValueError("no frames to average over")
    largest = min(max_rdf_radius(atoms) for atoms in frames)
    if rmax is None:
        rmax = largest
    elif rmax > largest * (1 + 1e-12):
        raise ValueError(
            f"rmax = {rmax} Å exceeds half the shortest cell height ({largest:.4f} Å); "
            "use a smaller rmax or a bigger cell"
        )
    n_bins = int(np.floor(rmax / bin_width + 1e-9))
    if n_bins < 1:
        raise ValueError(f"rmax = {rmax} Å is shorter than one bin ({bin_width} Å)")
    # vesin pulls in torch: imported here so loading tables and the CLI start quickly.
    from vesin import NeighborList

    bin_edges = np.arange(n_bins + 1) * bin_width
    shell_volumes = 4.0 / 3.0 * np.pi * np.diff(bin_edges**3)
    neighbor_list = NeighborList(cutoff=float(bin_edges[-1]), full_list=True)

    g_sum = np.zeros(n_bins)
    density_sum = 0.0
    for atoms in tqdm(frames, desc=f"g_{pair[0]}{pair[1]}(r)", unit="frame", disable=not progress):
        symbols = np.array(atoms.get_chemical_symbols())
        in_a, in_b = symbols == pair[0], symbols == pair[1]
        n_a, n_b = int(in_a.sum()), int(in_b.sum()) - (pair[0] == pair[1])
        if n_a == 0 or n_b <= 0:
            raise ValueError(
                f"a frame lacks the atoms for the pair {pair}: {atoms.get_chemical_formula()}"
            )
        first, second, distances = neighbor_list.compute(
            points=atoms.get_positions(), box=atoms.cell.array, periodic=True, quantities="ijd"
        )
        keep = in_a[first] & in_b[second]
        counts, _ = np.histogram(distances[keep], bins=bin_edges)
        volume = atoms.get_volume()
        g_sum += counts * volume / (n_a * n_b * shell_volumes)
        density_sum += int(in_b.sum()) / volume
    return RDFResult(
        r=0.5 * (bin_edges[1:] + bin_edges[:-1]),
        g=g_sum / len(frames),
        bin_edges=bin_edges,
        pair=(pair[0], pair[1]),
        n_frames=len(frames),
        partner_density=density_sum / len(frames),
    )


def load_experimental_rdf(name: str) -> ExperimentalRDF:
    """One of the shipped O–O tables: "skinner2013" (X-ray) or "soper2013" (EPSR)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experimental table {name!r}; choose one of {list(EXPERIMENTS)}")
    entry = EXPERIMENTS[name]
    text = resources.files("e2former_calc").joinpath("data", "water_rdf", entry["file"]).read_text()
    comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    citation = next(c for c in comments if c.startswith("Original citation:"))
    table = np.loadtxt(text.splitlines(), delimiter=",", comments="#", skiprows=len(comments) + 1)
    return ExperimentalRDF(
        name=name,
        r=table[:, 0],
        g=table[:, 1],
        error=table[:, 2],
        citation=citation.removeprefix("Original citation:").strip(),
        description=comments[0],
        temperature_K=entry["temperature_K"],
        number_density=entry["density_g_cm3"] / WATER_MASS_G_MOL * AVOGADRO * 1e-24,
    )


def rdf_metrics(r: np.ndarray, g: np.ndarray, partner_density: float) -> dict[str, float]:
    """Shape of a water-like g(r) on grid `r` (Å), as plain floats (None where the curve
    stops too early to tell):

    - first peak: the maximum of g for r in FIRST_PEAK_SEARCH, refined by a parabola through
      the three points around it (position Å, height),
    - first minimum: the minimum within FIRST_MINIMUM_SEARCH_WIDTH Å after the peak (same
      refinement),
    - coordination number n(3.3 Å) = 4π ρ ∫_0^3.3 g r² dr with ρ = `partner_density` (1/Å^3).
    """
    r, g = np.asarray(r, float), np.asarray(g, float)
    in_window = np.flatnonzero((r >= FIRST_PEAK_SEARCH[0]) & (r <= FIRST_PEAK_SEARCH[1]))
    if len(in_window) < 3:
        raise ValueError(f"g(r) has too few points in {FIRST_PEAK_SEARCH} Å to find a first peak")
    peak_position, peak_height = _parabolic_extremum(r, g, in_window[np.argmax(g[in_window])])
    metrics = {"first_peak_position_angstrom": peak_position, "first_peak_height": peak_height}
    after_peak = np.flatnonzero(
        (r > peak_position) & (r <= peak_position + FIRST_MINIMUM_SEARCH_WIDTH)
    )
    if len(after_peak) >= 3 and after_peak[-1] < len(r) - 1:
        position, height = _parabolic_extremum(r, g, after_peak[np.argmin(g[after_peak])])
        metrics.update(first_minimum_position_angstrom=position, first_minimum_height=height)
    else:
        # The curve stops before the search window does (small cell): no honest minimum.
        metrics.update(first_minimum_position_angstrom=None, first_minimum_height=None)
    if r[-1] >= COORDINATION_RADIUS:
        grid = np.concatenate([r[r < COORDINATION_RADIUS], [COORDINATION_RADIUS]])
        integrand = np.interp(grid, r, g) * grid**2
        metrics["coordination_number_3p3"] = float(
            4 * np.pi * partner_density * np.trapezoid(integrand, grid)
        )
    else:
        metrics["coordination_number_3p3"] = None
    return metrics


def compare_with_experiment(result: RDFResult, experiment: ExperimentalRDF) -> dict:
    """Metrics of `result` and of `experiment`, their differences, and the RMSE of g over
    RMSE_RANGE (the model interpolated onto the experimental grid). The RMSE range stops at
    the model's last bin centre when that is below 8 Å; `rmse_range_angstrom` says where.
    A JSON-serialisable dict."""
    model = rdf_metrics(result.r, result.g, result.partner_density)
    reference = rdf_metrics(experiment.r, experiment.g, experiment.number_density)
    upper = min(RMSE_RANGE[1], float(result.r[-1]))
    on_grid = (experiment.r >= RMSE_RANGE[0]) & (experiment.r <= upper)
    if on_grid.any():
        model_g = np.interp(experiment.r[on_grid], result.r, result.g)
        rmse = float(np.sqrt(np.mean((model_g - experiment.g[on_grid]) ** 2)))
    else:
        rmse = None
    differences = {
        f"{key}_difference": model[key] - reference[key]
        for key in model
        if model[key] is not None and reference[key] is not None
    }
    return {
        "model": model,
        "experiment": {"name": experiment.name, "citation": experiment.citation, **reference},
        **differences,
        "rmse": rmse,
        "rmse_range_angstrom": [RMSE_RANGE[0], upper],
    }


def write_rdf_csv(path: str | os.PathLike, result: RDFResult) -> None:
    """Columns r_angstrom (bin centre), g; a comment line says the pair, frames and bins."""
    header = (
        f"g_{result.pair[0]}{result.pair[1]}(r) averaged over {result.n_frames} frames, bin width "
        f"{result.bin_edges[1] - result.bin_edges[0]:.4g} A, partner density "
        f"{result.partner_density:.6g} 1/A^3\nr_angstrom,g"
    )
    np.savetxt(path, np.column_stack([result.r, result.g]), delimiter=",", fmt="%.6f",
               header=header, comments="# ")


def plot_rdf(
    path: str | os.PathLike,
    result: RDFResult,
    experiment: ExperimentalRDF | None = None,
    label: str = "simulation",
) -> None:
    """Write a PNG of `result`'s g(r), with `experiment` overlaid when given."""
    plot_rdf_curves(path, [(label, result.r, result.g)], experiment, pair=result.pair, rmax=result.rmax)


def plot_rdf_curves(
    path: str | os.PathLike,
    curves: list[tuple[str, np.ndarray, np.ndarray]],
    experiment: ExperimentalRDF | None = None,
    pair: tuple[str, str] = ("O", "O"),
    rmax: float | None = None,
    title: str = "",
) -> None:
    """Write a PNG of several g(r) curves, (label, r in Å, g) each, with `experiment` overlaid when
    given; the x axis ends at `rmax` (default: the largest r of the curves), or at 8 Å with an experiment."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rmax = max(float(r[-1]) for _, r, _ in curves) if rmax is None else rmax
    figure = Figure(figsize=(6, 4), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if experiment is not None:
        shown = experiment.r <= max(rmax, 8.0)
        axes.plot(experiment.r[shown], experiment.g[shown], color="black", lw=1.2,
                  label=f"experiment ({experiment.name})")
    for label, r, g in curves:
        axes.plot(r, g, color="tab:red" if len(curves) == 1 else None, lw=1.5, label=label)
    axes.axhline(1.0, color="grey", lw=0.5, ls=":")
    axes.set_xlabel("r (Å)")
    axes.set_ylabel(f"g$_{{{pair[0]}{pair[1]}}}$(r)")
    axes.set_xlim(0, max(rmax, 8.0) if experiment is not None else rmax)
    if title:
        axes.set_title(title)
    axes.legend(frameon=False, loc="upper right", fontsize="small")  # the right side is flat near g = 1
    figure.tight_layout()
    figure.savefig(path)


def _parabolic_extremum(r: np.ndarray, g: np.ndarray, index: int) -> tuple[float, float]:
    """Vertex (position, value) of the parabola through points index-1..index+1, kept within
    that bracket; falls back to the grid point at the ends of the curve."""
    if index == 0 or index == len(r) - 1:
        return float(r[index]), float(g[index])
    coefficients = np.polyfit(r[index - 1 : index + 2], g[index - 1 : index + 2], 2)
    if coefficients[0] == 0:
        return float(r[index]), float(g[index])
    vertex = float(np.clip(-coefficients[1] / (2 * coefficients[0]), r[index - 1], r[index + 1]))
    return vertex, float(np.polyval(coefficients, vertex))
