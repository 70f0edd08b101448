"""E2Former-V2: node-centric equivariant attention in which edges carry only scalars.

The whole network, top to bottom (DESIGN §3, §4):

    x = SpeciesEmbedding(Z) + DegreeEmbedding(neighbours)            # [N, (L+1)^2, C]
    for block in blocks:                                              # pre-norm transformer
        x = x + Attention(Norm(x) (+ charge/spin on l=0))
        x = x + GatedFFN(Norm(x))
    E_i = scale * MLP(Norm(x)[:, 0]) (+ ZBL_i) + E_ref[Z_i];  F_i = -dE/dr_i  (or a direct l=1 head)

Attention. Query and key are invariants of the node features, so every edge-dependent
quantity is a scalar per head: the logit s_ij = g_ij <q_i, k_j>/sqrt(d) + b_ij and the value
weight phi_ij, with g, b, phi functions of (d_ij, Z_i, Z_j). The message is first order,
m_i = sum_j alpha_ij x_j (x) R1(r̂_ij), with alpha_ij = phi_ij p(d_ij) e^{s_ij} /
(eps + sum_j' p(d_ij') e^{s_ij'}), p the polynomial envelope and eps the attention sink.
Two exact ways to evaluate it, same weights, same function (selected by `value_path`):

  "moments" (B): the fused op aggregates M_i,c = sum_j alpha_ij r̂_ij,c x_j, then one
                 Clebsch-Gordan contraction per node gives every path l1 (x) 1 -> l3.
  "eaas"    (A): the paper's factorisation sum_j a_ij x_j (x) R1(r_j) - (sum_j a_ij x_j) (x) R1(r_i)
                 with a = alpha/|r_ij|, both node-level products by EAAS. Non-periodic only.

Edge vector convention: r_ij = r_j - r_i (+ periodic shift), j the source, i the target.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from ase.data import covalent_radii
from torch import nn
from torch.utils.checkpoint import checkpoint

from e2former_calc.kernels.neighbor_attention import neighbor_attention
from e2former_calc.kernels.neighbor_attention_reference import envelope
from e2former_calc.models.eaas import EAASTensorProduct
from e2former_calc.models.graph import AtomicGraph, TargetChunk, geometric_matmul
from e2former_calc.models.so3 import clebsch_gordan, spherical_harmonics_up_to

VALUE_PATHS = ("moments", "eaas")
FORCE_MODES = ("conservative", "direct")


@dataclass
class E2FormerConfig:
    """Architecture hyper-parameters. Defaults are the paper-size model."""

    species: tuple[int, ...] = (1, 6, 7, 8)  # atomic numbers the model knows
    l_max: int = 2  # highest degree of the node features
    channels: int = 256  # C, channels per degree
    num_blocks: int = 4
    num_heads: int = 128  # H; channels // num_heads value channels per head and degree
    head_dim: int = 8  # query/key width per head
    cutoff: float = 6.0  # Å
    num_radial: int = 16  # Gaussian radial basis functions
    edge_hidden: int = 64  # width of the edge-scalar MLP
    ffn_multiplier: int = 2  # hidden channels of the gated FFN = ffn_multiplier * channels
    avg_num_neighbors: float = 30.0  # normalises the degree embedding
    value_path: str = "moments"  # "moments" (path B) or "eaas" (path A)
    center_eaas: bool = True  # path A: centre each system first (float32 precision far from the origin)
    sink: float = 1e-3  # attention sink eps
    use_charge_spin: bool = False
    max_charge: int = 4  # |total charge| the system embedding covers
    max_spin: int = 5  # highest spin multiplicity the system embedding covers
    energy_scale: float = 1.0  # eV, multiplies the per-atom energy head
    zbl: bool = False  # add the ZBL short-range nuclear repulsion under the learned energy

    def __post_init__(self):
        self.species = tuple(int(z) for z in self.species)
        if self.channels % self.num_heads:
            raise ValueError(f"channels ({self.channels}) must be a multiple of num_heads ({self.num_heads})")
        if self.value_path not in VALUE_PATHS:
            raise ValueError(f"value_path must be one of {VALUE_PATHS}, got {self.value_path!r}")
        if len(set(self.species)) != len(self.species) or not all(1 <= z <= 118 for z in self.species):
            raise ValueError(f"species must be distinct atomic numbers 1..118, got {self.species}")

    @classmethod
    def water_small(cls) -> "E2FormerConfig":
        """The small, fast preset the shipped water model uses (H and O)."""
        return cls(
            species=(1, 8), channels=64, num_blocks=3, num_heads=16, head_dim=8,
            cutoff=5.0, num_radial=12, edge_hidden=32, avg_num_neighbors=50.0,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["species"] = list(self.species)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "E2FormerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown E2FormerConfig fields: {sorted(unknown)}")
        return cls(**data)


class GaussianBasis(nn.Module):
    """[E] distances (Å) -> [E, num_radial] Gaussians on an even grid over [0, cutoff]."""

    def __init__(self, cutoff: float, num_radial: int):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, cutoff, num_radial))
        self.width = cutoff / (num_radial - 1)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * ((distance[:, None] - self.centers) / self.width) ** 2)


# Short-range repulsion (ZBL universal screened Coulomb; Ziegler, Biersack, Littmark 1985).
COULOMB_EV_ANGSTROM = 14.399645  # e^2 / (4 pi eps_0), eV·Å
BOHR_ANGSTROM = 0.529177210903
SCREENING_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
SCREENING_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)


class ZBLRepulsion(nn.Module):
    """Pair energies V(r) p(r / r_c) (eV) of edges between the model's species (`zbl=True`).

    A network trained on liquid-like geometries has never seen two nuclei 0.6 Å apart and may
    predict an attractive hole there (the first water model shot a hydrogen into one after 22.7 ps
    of NVT). Under the learned energy sits the universal screened Coulomb repulsion

        V(r) = Z_i Z_j e^2 / (4 pi eps_0 r) phi(r / a),   a = 0.8854 a_0 / (Z_i^0.23 + Z_j^0.23),
        phi(x) = sum_k c_k exp(-b_k x)   (SCREENING_COEFFICIENTS c, SCREENING_EXPONENTS b),

    switched off by the polynomial envelope at r_c = the sum of the two covalent radii (Cordero
    2008, from ase.data): zero beyond O–H 0.97, H–H 0.62, O–O 1.32 Å, tens of eV as nuclei merge.
    """

    def __init__(self, species: tuple[int, ...]):
        super().__init__()
        atomic_number = torch.tensor(species, dtype=torch.float64)
        radius = torch.tensor(covalent_radii[list(species)], dtype=torch.float64)
        powers = atomic_number**0.23
        # Tables over species pairs, flat in the model's species_pair = target * S + source order.
        pair_tables = {
            "charge_product": atomic_number[:, None] * atomic_number[None, :],
            "screening_length": 0.8854 * BOHR_ANGSTROM / (powers[:, None] + powers[None, :]),
            "cutoff": radius[:, None] + radius[None, :],
        }
        for name, table in pair_tables.items():
            self.register_buffer(name, table.flatten(), persistent=False)

    def forward(self, distance: torch.Tensor, species_pair: torch.Tensor) -> torch.Tensor:
        """[E] distances (Å) and species-pair indices -> [E] pair energies (eV), each pair's full V
        (a symmetric neighbour list holds each pair twice: halve for per-atom shares)."""
        charge_product = self.charge_product[species_pair]
        screening_length = self.screening_length[species_pair]
        cutoff = self.cutoff[species_pair]
        # Beyond r_c the envelope is zero; clamp the distance so that no 1/r of a far pair overflows.
        distance = distance.clamp(min=1e-3)
        x = distance / screening_length
        screening = sum(c * torch.exp(-b * x) for c, b in zip(SCREENING_COEFFICIENTS, SCREENING_EXPONENTS))
        return COULOMB_EV_ANGSTROM * charge_product / distance * screening * envelope(distance, cutoff)


def degree_of_rows(l_max: int) -> torch.Tensor:
    """[(L+1)^2] long, the degree l of each row of a node feature tensor."""
    return torch.cat([torch.full((2 * l + 1,), l) for l in range(l_max + 1)])


def degree_membership(l_max: int) -> torch.Tensor:
    """[(L+1)^2, L+1] 0/1 matrix: row r belongs to degree l. `features^T @ it` sums each degree's rows.

    The per-degree modules below work on all rows at once (one batched product, masks like this
    one) rather than slicing per degree: the network runs as far fewer, larger kernels, and the
    small-molecule step is bound by kernel launches, not arithmetic.
    """
    return (degree_of_rows(l_max)[:, None] == torch.arange(l_max + 1)).to(torch.get_default_dtype())


class DegreeWiseLinear(nn.Module):
    """[N, (L+1)^2, C_in] -> [N, (L+1)^2, C_out]: one matrix per degree, shared over m.

    Commutes with rotations; the bias is added to the l=0 row only.
    """

    def __init__(self, l_max: int, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.l_max = l_max
        self.weight = nn.Parameter(torch.randn(l_max + 1, in_channels, out_channels) / math.sqrt(in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("row_degree", degree_of_rows(l_max), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One batched product over the rows, each with its degree's matrix.
        out = torch.bmm(x.transpose(0, 1), self.weight.index_select(0, self.row_degree)).transpose(0, 1)
        if self.bias is not None:
            out = out + F.pad(self.bias[None], (0, 0, 0, out.shape[1] - 1))  # l=0 row only
        return out


class EquivariantRMSNorm(nn.Module):
    """EquiformerV2-style norm of [N, (L+1)^2, C] features.

    The l=0 row is centred over channels; every row is divided by the root of the
    degree-balanced mean square (mean over m and channels per degree, then over degrees);
    learnable scale per (l, channel), bias on l=0 only.
    """

    def __init__(self, l_max: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.l_max, self.eps = l_max, eps
        self.scale = nn.Parameter(torch.ones(l_max + 1, channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("row_degree", degree_of_rows(l_max), persistent=False)
        self.register_buffer("membership", degree_membership(l_max), persistent=False)
        self.register_buffer("degree_width", 2.0 * torch.arange(l_max + 1) + 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scalar_row = self.membership[:, :1]  # [(L+1)^2, 1], 1 on the l=0 row
        x = x - scalar_row * x[:, :1].mean(dim=-1, keepdim=True)  # centre the scalars over channels
        mean_square = ((x.pow(2).mean(dim=-1) @ self.membership) / self.degree_width).mean(dim=-1)
        x = x * torch.rsqrt(mean_square + self.eps)[:, None, None] * self.scale.index_select(0, self.row_degree)
        return x + scalar_row * self.bias


class GatedFFN(nn.Module):
    """Degree-wise linear -> gate (SiLU on scalars, sigmoid gates from scalars on l>0) -> linear."""

    def __init__(self, l_max: int, channels: int, hidden: int):
        super().__init__()
        self.l_max, self.hidden = l_max, hidden
        self.linear_in = DegreeWiseLinear(l_max, channels, hidden)
        self.gates = nn.Linear(channels, l_max * hidden)
        self.linear_out = DegreeWiseLinear(l_max, hidden, channels)
        self.register_buffer("gate_of_row", degree_of_rows(l_max)[1:] - 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x)
        gates = torch.sigmoid(self.gates(x[:, 0])).view(-1, self.l_max, self.hidden)
        gated = h[:, 1:] * gates.index_select(1, self.gate_of_row)  # row of degree l > 0: gate l
        return self.linear_out(torch.cat([F.silu(h[:, :1]), gated], dim=1))


class EdgeScalars(nn.Module):
    """Per-edge, per-head scalars from distance and species: logit scale g, logit bias b, value weight phi.

    [E, num_radial] radial basis and [E] species-pair index -> three [E, H] tensors.
    Initialised near g = 1, b = 0, phi = 1.
    """

    def __init__(self, num_radial: int, num_species: int, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.radial = nn.Linear(num_radial, hidden)
        self.pair = nn.Embedding(num_species * num_species, hidden)
        self.out = nn.Linear(hidden, 3 * num_heads)
        nn.init.normal_(self.out.weight, std=0.1 / math.sqrt(hidden))
        nn.init.zeros_(self.out.bias)

    def forward(self, radial_basis: torch.Tensor, species_pair: torch.Tensor):
        h = F.silu(self.radial(radial_basis) + self.pair(species_pair))
        scale, bias, value_weight = self.out(h).split(self.num_heads, dim=-1)
        return 1 + scale, bias, 1 + value_weight


def first_order_paths(l_max: int) -> list[tuple[int, int]]:
    """The (l1, l3) paths of x^(l1) (x) Y^1 -> l3 with l3 <= l_max, in EAAS output order."""
    return [(l1, l3) for l1 in range(l_max + 1) for l3 in range(abs(l1 - 1), min(l1 + 1, l_max) + 1)]


class EquivariantAttention(nn.Module):
    """Node-centric equivariant attention with scalar-only edges (module docstring)."""

    def __init__(self, config: E2FormerConfig):
        super().__init__()
        L, C, H = config.l_max, config.channels, config.num_heads
        self.config = config
        self.invariant_left = DegreeWiseLinear(L, C, C, bias=False)
        self.invariant_right = DegreeWiseLinear(L, C, C, bias=False)
        self.query = nn.Sequential(nn.Linear((L + 1) * C, C), nn.SiLU(), nn.Linear(C, H * config.head_dim))
        self.key = nn.Sequential(nn.Linear((L + 1) * C, C), nn.SiLU(), nn.Linear(C, H * config.head_dim))
        self.value = DegreeWiseLinear(L, C, C)
        self.edge_scalars = EdgeScalars(config.num_radial, len(config.species), config.edge_hidden, H)
        self.paths = first_order_paths(L)
        self._coupling_cache = {}
        self.register_buffer("membership", degree_membership(L), persistent=False)
        self.output = nn.ModuleList(
            nn.Linear(sum(1 for _, l3 in self.paths if l3 == l) * C, C, bias=(l == 0)) for l in range(L + 1)
        )
        if config.value_path == "eaas":
            self.eaas = EAASTensorProduct(L, 1, L)

    def coupling(self, like: torch.Tensor) -> torch.Tensor:
        """[3 (L+1)^2, Q] every path's sqrt(3) CG(l1, 1, l3) in one matrix, in `like`'s dtype and device.

        Row 3-major (f, r): component f of r̂ times input row r of degree l1; column (l3, path, o):
        output row o of each path, paths grouped by l3 in `self.paths` order. R1(r̂) = sqrt(3) r̂ in
        component normalisation. Built from the float64 tables on first use and cached (not a buffer,
        so that casting the model to float32 and back never rounds it).
        """
        key = (like.dtype, like.device)
        if key not in self._coupling_cache:
            rows = (self.config.l_max + 1) ** 2
            blocks = []
            for l3 in range(self.config.l_max + 1):
                for l1, out_degree in self.paths:
                    if out_degree == l3:
                        block = torch.zeros(3, rows, 2 * l3 + 1, dtype=torch.float64)
                        block[:, l1 * l1 : (l1 + 1) ** 2] = math.sqrt(3) * clebsch_gordan(l1, 1, l3).transpose(0, 1)
                        blocks.append(block.reshape(3 * rows, 2 * l3 + 1))
            self._coupling_cache[key] = torch.cat(blocks, dim=1).to(dtype=like.dtype, device=like.device)
        return self._coupling_cache[key]

    def contract_moments(self, moments: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, (L+1)^2, C] moments -> per l3, [N, 2l3+1, paths_l3 * C]: every l1 (x) 1 -> l3 path, in one product."""
        N, _, rows, C = moments.shape
        products = moments.reshape(N, 3 * rows, C).transpose(1, 2) @ self.coupling(moments)  # [N, C, Q]
        out, start = [], 0
        for l3 in range(self.config.l_max + 1):
            paths = sum(1 for _, out_degree in self.paths if out_degree == l3)
            block = products[:, :, start : start + paths * (2 * l3 + 1)].reshape(N, C, paths, 2 * l3 + 1)
            out.append(block.permute(0, 3, 2, 1).reshape(N, 2 * l3 + 1, paths * C))
            start += paths * (2 * l3 + 1)
        return out

    def invariants(self, x: torch.Tensor) -> torch.Tensor:
        """[N, (L+1)^2, C] -> [N, (L+1)*C]: s_l = sum_m (W1_l x)_lm * (W2_l x)_lm per degree."""
        product = self.invariant_left(x) * self.invariant_right(x)
        return (product.transpose(1, 2) @ self.membership).transpose(1, 2).reshape(x.shape[0], -1)

    def forward(self, x, graph: AtomicGraph, edge_vector, radial_basis, species_pair, positions, create_graph):
        """[N, (L+1)^2, C] normed features -> [N, (L+1)^2, C] attention update of every atom."""
        (everything,) = graph.target_chunks()
        return self.chunk_update(self.node_terms(x, positions), graph, everything, edge_vector, radial_basis,
                                 species_pair, positions, create_graph)

    def node_terms(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What every target row reads: query and key [N, H, D], and the source payload [N, H, rows * C/H]."""
        cfg = self.config
        N, C, H = x.shape[0], cfg.channels, cfg.num_heads
        invariants = self.invariants(x)
        query = self.query(invariants).view(N, H, cfg.head_dim)
        key = self.key(invariants).view(N, H, cfg.head_dim)
        values = self.value(x)
        if cfg.value_path == "eaas":
            values = torch.cat([self.eaas(values, positions), values], dim=1)  # [N, R_T + R, C]
        per_head = values.view(N, values.shape[1], H, C // H).permute(0, 2, 1, 3).reshape(N, H, -1)
        return query, key, per_head

    def chunk_update(self, terms, graph: AtomicGraph, chunk: TargetChunk, edge_vector, radial_basis, species_pair,
                     positions, create_graph) -> torch.Tensor:
        """The attention update [n, (L+1)^2, C] of the n target atoms of `chunk`, from `node_terms`."""
        cfg = self.config
        query, key, per_head = terms
        C, H = cfg.channels, cfg.num_heads
        atoms, edges = chunk.atoms, chunk.edges
        n, whole = atoms.stop - atoms.start, atoms.stop - atoms.start == graph.num_atoms
        logit_scale, logit_bias, value_weight = self.edge_scalars(radial_basis[edges], species_pair[edges])
        payload = "direction" if cfg.value_path == "moments" else "inverse_distance"
        out = neighbor_attention(
            query[atoms], key, per_head, edge_vector[edges], logit_scale, logit_bias, value_weight,
            graph.chunk_row_ptr(chunk), graph.source_index[edges], cfg.cutoff, payload=payload, sink=cfg.sink,
            transpose=graph.transposed if whole and query.is_cuda and not create_graph else None,
            use_kernel=False if create_graph else None,
        )  # [n, A, H, rows * C/H]
        A, rows = out.shape[1], per_head.shape[-1] // (C // H)
        sums = out.view(n, A, H, rows, C // H).permute(0, 1, 3, 2, 4).reshape(n, A, rows, C)
        if cfg.value_path == "moments":
            stacked = self.contract_moments(sums)  # from [n, 3, R, C] moments
        else:
            sums, source_rows = sums[:, 0], rows - (cfg.l_max + 1) ** 2
            combined = sums[:, :source_rows] - self.eaas(sums[:, source_rows:], positions[atoms])
            path_outputs = [combined[:, path_rows] for path_rows in self.eaas.path_rows()]
            stacked = [
                torch.cat([p for p, (_, l3) in zip(path_outputs, self.paths) if l3 == l], dim=-1)
                for l in range(cfg.l_max + 1)
            ]
        return torch.cat([self.output[l](stacked[l]) for l in range(cfg.l_max + 1)], dim=1)


class ScatterSum(torch.autograd.Function):
    """out[index[e]] += source[e]: [E, ...] rows summed into [num_rows, ...].

    The same as `index_add`, but autograd keeps only the index for the backward pass, where
    `index_add` keeps the whole source as well: for the degree embedding's [E, (L+1)^2, R] edge
    terms ~29 kB per atom (paper size, 50 neighbours) held until the force pass. The backward is an `index_select`
    of the incoming gradient, itself differentiable (double backward, for force training).
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return source.new_zeros((num_rows, *source.shape[1:])).index_add_(0, index, source)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class DegreeEmbedding(nn.Module):
    """Initial features from the neighbourhood (DESIGN §3), for every degree l = 0..L:

    h_i^(l) = W_l (1/avg_deg) sum_j p(d_ij) Y_l(r̂_ij) (rbf(d_ij) * e(Z_j)),
    aggregated at the width of the radial basis (an [E, (L+1)^2, R] tensor, never E x C),
    then mapped to C channels per degree. The l=0 row adds a radial density to the species
    embedding.
    """

    def __init__(self, config: E2FormerConfig):
        super().__init__()
        self.config = config
        self.source_species = nn.Embedding(len(config.species), config.num_radial)
        self.linear = DegreeWiseLinear(config.l_max, config.num_radial, config.channels, bias=False)

    def forward(self, graph, edge_vector, distance, radial_basis, species_index, chunks: list[TargetChunk]):
        """[N, (L+1)^2, C], summed chunk by chunk (one chunk's [edges, (L+1)^2, R] terms at a time)."""
        cfg = self.config
        summed = radial_basis.new_zeros(graph.num_atoms, (cfg.l_max + 1) ** 2, cfg.num_radial)
        for chunk in chunks:
            edges = chunk.edges
            harmonics = spherical_harmonics_up_to(cfg.l_max, edge_vector[edges], normalize=True)  # [e, (L+1)^2]
            radial = radial_basis[edges] * self.source_species(species_index[graph.source_index[edges]])
            radial = radial * envelope(distance[edges], cfg.cutoff)[:, None]
            edge_terms = harmonics[:, :, None] * radial[:, None, :]  # [e, (L+1)^2, num_radial]
            summed = summed + ScatterSum.apply(edge_terms, graph.target_index[edges], graph.num_atoms)
        return self.linear(summed / cfg.avg_num_neighbors)


class E2FormerV2(nn.Module):
    """The E2Former-V2 interatomic potential. See the module docstring for the architecture."""

    def __init__(self, config: E2FormerConfig):
        super().__init__()
        self.config = config
        L, C = config.l_max, config.channels
        self.register_buffer("reference_energy", torch.zeros(len(config.species)))
        species_index = torch.full((119,), -1, dtype=torch.long)
        species_index[list(config.species)] = torch.arange(len(config.species))
        self.register_buffer("species_index_of", species_index, persistent=False)
        self.species_embedding = nn.Embedding(len(config.species), C)
        self.degree_embedding = DegreeEmbedding(config)
        self.radial_basis = GaussianBasis(config.cutoff, config.num_radial)
        if config.use_charge_spin:
            self.charge_embedding = nn.Embedding(2 * config.max_charge + 1, C)
            self.spin_embedding = nn.Embedding(config.max_spin, C)
        self.attention_norms = nn.ModuleList(EquivariantRMSNorm(L, C) for _ in range(config.num_blocks))
        self.attentions = nn.ModuleList(EquivariantAttention(config) for _ in range(config.num_blocks))
        self.ffn_norms = nn.ModuleList(EquivariantRMSNorm(L, C) for _ in range(config.num_blocks))
        self.ffns = nn.ModuleList(GatedFFN(L, C, config.ffn_multiplier * C) for _ in range(config.num_blocks))
        self.final_norm = EquivariantRMSNorm(L, C)
        self.energy_head = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, 1))
        self.force_head = nn.Linear(C, 1, bias=False)
        self.repulsion = ZBLRepulsion(config.species) if config.zbl else None
        # Memory for time, not part of the function: when set, a backward pass (conservative forces
        # without create_graph) keeps only each block's input and recomputes the block's activations.
        self.recompute_blocks = False
        # Systems larger than this go through the network this many target atoms at a time, without
        # autograd or with recompute_blocks. 16,384 rather than 65,536: on an H200 it held 2.0-2.4x
        # less memory in direct mode at 100k-250k atoms for 2-5% of the speed (BENCHMARKS.md).
        self.chunk_atoms = 16384
        self.compiled_block = None  # compile_blocks()

    def compile_blocks(self) -> "E2FormerV2":
        """Compile the transformer block with torch.compile, fusing the per-atom and per-edge
        elementwise chains around the attention, which runs as it is. One compilation serves every
        block and every edge count; each new atom count N (and grad mode) compiles again, at its first
        call, so it suits MD (fixed N), and past torch._dynamo's recompile limit (8) a new N runs
        eagerly. Used where a system goes through in one piece without recomputation; chunked passes
        stay eager. Returns the model."""
        self.compiled_block = torch.compile(E2FormerV2.block, dynamic=True)  # no self: a deep copy may share it
        return self

    def species_index(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """[N] atomic numbers -> [N] index into config.species; ValueError for unknown elements."""
        index = self.species_index_of[atomic_numbers.clamp(0, 118)]
        if atomic_numbers.is_cuda and torch.cuda.is_current_stream_capturing():
            return index  # the check reads back to the host, which a CUDA-graph capture cannot; its warm-up ran it
        unknown = (index < 0) | (atomic_numbers > 118) | (atomic_numbers < 1)
        if unknown.any():
            bad = sorted(set(atomic_numbers[unknown].tolist()))
            raise ValueError(f"elements with atomic numbers {bad} are not supported; this model knows {list(self.config.species)}")
        return index

    def species_pairs(self, graph: AtomicGraph, species: torch.Tensor) -> torch.Tensor:
        """[E] index of each edge's (target, source) species pair: target * S + source."""
        return species[graph.target_index] * len(self.config.species) + species[graph.source_index]

    def node_features(self, graph: AtomicGraph, positions=None, edge_vector=None, create_graph=False):
        """[N, (L+1)^2, C] final (normed) node features and [N] species index."""
        cfg = self.config
        positions = graph.positions if positions is None else positions
        edge_vector = graph.edge_vectors(positions) if edge_vector is None else edge_vector
        species = self.species_index(graph.atomic_numbers)
        distance = edge_vector.norm(dim=-1)
        radial_basis = self.radial_basis(distance)
        species_pair = self.species_pairs(graph, species)

        # Large systems go through the network in chunks of target atoms, so that edge-sized
        # temporaries exist for one chunk at a time: without autograd (direct forces, energies), and
        # with recomputation, where the force pass recomputes each chunk's update on its own.
        recompute = self.recompute_blocks and torch.is_grad_enabled() and not create_graph
        chunks = graph.target_chunks(self.chunk_atoms if recompute or not torch.is_grad_enabled() else None)
        x = self.degree_embedding(graph, edge_vector, distance, radial_basis, species, chunks)
        x = torch.cat([x[:, :1] + self.species_embedding(species)[:, None, :], x[:, 1:]], dim=1)
        system = self.system_embedding(graph)
        if cfg.value_path == "eaas" and bool((graph.cell_shift != 0).any()):
            raise ValueError("value_path='eaas' supports non-periodic systems only; use 'moments'")
        if cfg.value_path == "eaas" and cfg.center_eaas:
            # Centre each system: EAAS works with absolute positions (DESIGN §4 A, precision).
            counts = torch.bincount(graph.system_index, minlength=graph.num_systems).clamp(min=1)
            centre = torch.zeros_like(graph.cell[:, 0]).index_add(0, graph.system_index, positions) / counts[:, None]
            positions = positions - centre[graph.system_index]
        compiled = self.compiled_block is not None and not recompute and len(chunks) == 1
        block = self.compiled_block if compiled else self.block
        for index in range(cfg.num_blocks):
            layers = (self.attention_norms[index], self.attentions[index], self.ffn_norms[index], self.ffns[index])
            arguments = (layers, x, graph, edge_vector, radial_basis, species_pair, positions, system, create_graph, chunks)
            x = checkpoint(self.block, *arguments, use_reentrant=False) if recompute else block(*arguments)
        return self.final_norm(x), species

    @staticmethod
    def block(layers, x, graph, edge_vector, radial_basis, species_pair, positions, system, create_graph, chunks):
        """A transformer block: x + Attention(Norm(x)), then + GatedFFN(Norm(.)); [N, (L+1)^2, C].

        `layers` are the block's (attention norm, attention, FFN norm, FFN) modules, passed rather than
        looked up by block number so that one torch.compile of this method serves every block.

        With several target `chunks` the updates go chunk by chunk: in place without autograd, each
        chunk's recomputed in the backward pass with it (recompute_blocks).
        """
        attention_norm, attention, ffn_norm, ffn = layers
        h = attention_norm(x)
        if system is not None:
            h = torch.cat([h[:, :1] + system[graph.system_index, None, :], h[:, 1:]], dim=1)
        if len(chunks) == 1:
            x = x + attention(h, graph, edge_vector, radial_basis, species_pair, positions, create_graph)
            return x + ffn(ffn_norm(x))
        terms = attention.node_terms(h, positions)
        inputs = (edge_vector, radial_basis, species_pair, positions, create_graph)
        if not torch.is_grad_enabled():
            for chunk in chunks:
                x[chunk.atoms] += attention.chunk_update(terms, graph, chunk, *inputs)
            for chunk in chunks:
                x[chunk.atoms] += ffn(ffn_norm(x[chunk.atoms]))
            return x
        x = x + torch.cat([checkpoint(attention.chunk_update, terms, graph, chunk, *inputs, use_reentrant=False)
                           for chunk in chunks])
        return x + torch.cat([checkpoint(lambda rows: ffn(ffn_norm(rows)), x[chunk.atoms], use_reentrant=False)
                              for chunk in chunks])

    def system_embedding(self, graph: AtomicGraph):
        """[B, C] embedding of total charge and spin multiplicity, or None if the model has none."""
        cfg = self.config
        if not cfg.use_charge_spin:
            return None
        if (graph.charge.abs() > cfg.max_charge).any() or (graph.spin < 1).any() or (graph.spin > cfg.max_spin).any():
            raise ValueError(
                f"charge must be within ±{cfg.max_charge} and spin multiplicity within 1..{cfg.max_spin}; "
                f"got charge {graph.charge.tolist()}, spin {graph.spin.tolist()}"
            )
        return self.charge_embedding(graph.charge + cfg.max_charge) + self.spin_embedding(graph.spin - 1)

    def forward(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        mode: str = "conservative",
        create_graph: bool = False,
    ) -> dict:
        """Energies (eV), forces (eV/Å) and stress (eV/Å^3) of the packed systems.

        Returns {"energy": [B] (float64), "energies": [N], "forces": [N, 3], "stress": [B, 3, 3]}, the
        last two only when asked. Conservative forces are -dE/dr; the stress is (1/V) dE/d(strain) with
        a symmetric strain applied to positions and cell (ASE's sign). `create_graph` keeps the
        graph of the forces for training on them (and uses the twice-differentiable reference path).
        """
        if mode not in FORCE_MODES:
            raise ValueError(f"mode must be one of {FORCE_MODES}, got {mode!r}")
        if compute_stress and mode == "direct":
            raise ValueError("stress needs mode='conservative' (the direct head predicts forces only)")
        conservative = mode == "conservative" and (compute_forces or compute_stress)
        positions, cell = graph.positions, graph.cell
        with torch.enable_grad() if conservative else contextlib.nullcontext():
            if conservative:
                positions = leaf_positions = positions.detach().requires_grad_(True)
            if compute_stress:
                strain = torch.zeros_like(cell, requires_grad=True)
                symmetric = 0.5 * (strain + strain.transpose(1, 2))
                strain_of_atom = symmetric[graph.system_index]
                positions = positions + geometric_matmul(positions.unsqueeze(1), strain_of_atom).squeeze(1)
                cell = cell + geometric_matmul(cell, symmetric)
            edge_vector = graph.edge_vectors(positions, cell)
            features, species = self.node_features(graph, positions, edge_vector, create_graph)
            learned = self.config.energy_scale * self.energy_head(features[:, 0]).squeeze(-1)
            repulsion_forces = None
            if self.repulsion is not None:
                repulsion, repulsion_forces = self.repulsion_terms(
                    graph, edge_vector, species, direct_forces=mode == "direct" and compute_forces)
                learned = learned + repulsion
            reference = self.reference_energy[species]
            energies = learned + reference
            # Totals in float64: in float32 a total near -4.5e5 eV (216 waters) is only good to 0.03 eV.
            totals = torch.zeros_like(graph.cell[:, 0, 0], dtype=torch.float64)
            energy = totals.index_add(0, graph.system_index, learned.double()).index_add(
                0, graph.system_index, reference.double()
            )
            result = {"energy": energy, "energies": energies}
            if conservative:
                wrt = [leaf_positions, strain] if compute_stress else [leaf_positions]
                grads = torch.autograd.grad(energy.sum(), wrt, create_graph=create_graph)
                if compute_forces:
                    result["forces"] = -grads[0]
                if compute_stress:
                    cell_rows = graph.cell.unbind(1)  # triple product: no LAPACK call (CUDA-graph capture)
                    volume = (cell_rows[0] * torch.linalg.cross(cell_rows[1], cell_rows[2])).sum(-1).abs()
                    result["stress"] = grads[1] / volume[:, None, None]
            elif compute_forces:
                result["forces"] = self.force_head(features[:, 1:4]).squeeze(-1)
                if repulsion_forces is not None:  # the direct head learns the forces on top of the repulsion's
                    result["forces"] = result["forces"] + repulsion_forces
        return result

    def repulsion_terms(self, graph: AtomicGraph, edge_vector: torch.Tensor, species: torch.Tensor, direct_forces: bool):
        """[N] per-atom shares (eV) of the ZBL pair repulsion and, for `direct_forces`, its [N, 3]
        forces (eV/Å), by autograd on positions of its own: the direct mode's network has no graph to
        the positions. Otherwise (None) the repulsion's forces come with the model's own -dE/dr."""
        if not direct_forces:
            return self.repulsion_energies(graph, edge_vector, species), None
        with torch.enable_grad():
            leaf = graph.positions.detach().requires_grad_(True)
            shares = self.repulsion_energies(graph, graph.edge_vectors(leaf), species)
            (gradient,) = torch.autograd.grad(shares.sum(), leaf)
        return shares.detach(), -gradient

    def repulsion_energies(self, graph: AtomicGraph, edge_vector: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """[N] per-atom shares (eV) of the ZBL pair repulsion: half of each pair to either atom."""
        pair = self.repulsion(edge_vector.norm(dim=-1), self.species_pairs(graph, species))
        return edge_vector.new_zeros(graph.num_atoms).index_add(0, graph.target_index, 0.5 * pair)

