"""Sparse 3D convolution (mmcv.ops.SubMConv3d / SparseConv3d / SparseInverseConv3d) in plain PyTorch.

The rulebook is a neighbour table ``neighbors[out_row, kernel_offset] = in_row`` (``num_in`` where the site has no
active input at that offset), built with sort-based joins on linear site indices: a sorted unique over keys and
queries together, then a scatter from the keys' unique ids. (``torch.searchsorted`` does the same lookup but has no
ONNX translation; the unique is ``ops.unique.sorted_unique``, not ``torch.unique``, whose ONNX ``Unique`` IREE
cannot import.) The convolution is then one gather and one GEMM:
``features[neighbors] (N_out, K*C_in) @ weight (K*C_in, C_out)``, an implicit GEMM with no scatter-add.

Geometry follows mmcv's rulebook (csrc/common/utils/spconv/spconv/geometry.h): output site ``o`` reads input site
``p = o * stride - padding + k * dilation`` for kernel offset ``k`` (row-major over the kernel dims); submanifold
convolutions use stride 1 and padding ``kernel_size // 2`` whatever padding the module was given, and keep the
input sites. Output sites of a strided convolution come sorted by (batch, z, y, x), the order of mmcv's CUDA kernel.
Sparse-conv tensors of mmcv and of this module both work: the forward only reads ``features``, ``indices``,
``spatial_shape``, ``batch_size`` and ``indice_dict``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_true

from .unique import sorted_unique

__all__ = ["SparseConvTensor", "Rulebook", "SparseConvolution", "SubMConv3d", "SparseConv3d", "SparseInverseConv3d",
           "SparseMaxPool", "SparseMaxPool3d", "sparse_conv_forward", "sparse_maxpool_forward",
           "sparse_sequential_forward", "subm_rulebook", "conv_rulebook", "inverse_neighbors"]


@dataclass
class SparseConvTensor:
    """Same fields and ``dense()`` as mmcv.ops.SparseConvTensor, without mmcv."""

    features: Tensor
    indices: Tensor
    spatial_shape: Sequence[int]
    batch_size: int
    grid: Tensor | None = None
    indice_dict: dict[str, Any] = field(default_factory=dict)

    def find_indice_pair(self, key: str | None) -> Any:
        return None if key is None else self.indice_dict.get(key)

    def dense(self, channels_first: bool = True) -> Tensor:
        shape = [self.batch_size, *self.spatial_shape, self.features.shape[1]]
        canvas = self.features.new_zeros(shape)
        canvas = canvas.index_put(tuple(self.indices.long().unbind(1)), self.features)
        if not channels_first:
            return canvas
        ndim = len(self.spatial_shape)
        return canvas.permute(0, ndim + 1, *range(1, ndim + 1)).contiguous()


@dataclass(frozen=True)
class Rulebook:
    """What mmcv keeps under ``indice_dict[indice_key]``, as a neighbour table instead of (K, 2, L) pair lists."""

    in_indices: Tensor
    out_indices: Tensor
    neighbors: Tensor  # (num_out, kernel_volume) int64, num_in where absent
    in_spatial_shape: list[Any]  # ints, or 0-d tensors for a data-dependent grid (_grid_extents)
    out_spatial_shape: list[Any]


def _as_list(value: int | Sequence[int], ndim: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * ndim


def _grid_extents(spatial_shape: Any) -> list[Any]:
    """The grid's extents as Python ints, or as 0-d int64 tensors where any extent is a tensor.

    Most models fix the grid in their config (Cylinder3D passes a numpy shape, hence int()). MinkUNet's spconv
    backbone takes it from the data (``coors.max(0)[0][1:] + 1``): those stay tensors, so an exported graph
    computes the grid from its inputs instead of specializing to the sample's (int() would make it unbacked)."""
    if any(isinstance(size, Tensor) for size in spatial_shape):
        return [torch.as_tensor(size).long() for size in spatial_shape]
    return [int(size) for size in spatial_shape]


def _fixed_grid(extents: Sequence[Any]) -> bool:
    """Whether the grid's size is known before the data (ints), which a dense site table and the site-count bound
    need; a data-dependent grid (0-d tensors) always sorts."""
    return all(isinstance(size, int) for size in extents)


def _extent_tensor(extents: Sequence[Any], device: torch.device) -> Tensor:
    return torch.stack([torch.as_tensor(size, device=device).long() for size in extents])


def _kernel_offsets(kernel_size: Sequence[int], device: torch.device) -> Tensor:
    """(K, ndim) kernel offsets in mmcv's weight order (row-major over the kernel dims)."""
    return torch.tensor(list(itertools.product(*(range(k) for k in kernel_size))), dtype=torch.int64,
                        device=device).reshape(-1, len(kernel_size))


def _linear(batch: Tensor, coords: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """Row-major linear site index over (batch, *spatial_shape); coords (..., ndim) int64."""
    linear = batch
    for axis, extent in enumerate(spatial_shape):
        linear = linear * extent + coords[..., axis]
    return linear


def _delinearize(linear: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    columns = []
    for extent in reversed(spatial_shape):
        columns.append(linear % extent)
        linear = linear // extent
    columns.append(linear)
    return torch.stack(columns[::-1], dim=1)


SiteIndex = Literal["sort", "dense"]
# Dense site tables are int32 rows over every cell of the grid: 4 bytes a cell, so at most 2**31 cells (8 GiB).
# Larger grids fall back to the sort, however slow the backend's sort is.
_DENSE_MAX_CELLS = 2**31


def _use_dense(site_index: SiteIndex, num_cells: int) -> bool:
    return site_index == "dense" and num_cells <= _DENSE_MAX_CELLS


def _lookup(keys: Tensor, queries: Tensor, num_cells: int, site_index: SiteIndex) -> Tensor:
    """Row of each query in ``keys`` (distinct sites in [0, num_cells)), ``len(keys)`` where absent (query -1).

    "sort": a sort-based hash join, O(n log n) where sorting is. "dense": a table over the whole grid, for backends
    whose sort is quadratic (IREE 3.13 lowers ONNX TopK to a selection: 2.3 s for 64k keys on this CPU, hours for
    the ~450k keys and queries of SECOND's first layer), at 4 bytes a grid cell.
    """
    num_keys = keys.shape[0]
    if _use_dense(site_index, num_cells):
        rows = torch.arange(num_keys, dtype=torch.int32, device=keys.device)
        table = torch.full((num_cells + 1,), num_keys, dtype=torch.int32, device=keys.device)
        table = table.index_put((keys,), rows)
        return table[torch.where(queries < 0, num_cells, queries)].long()  # the spare last cell is never a key
    _, unique_id = sorted_unique(torch.cat([keys, queries]))
    row_of_unique = torch.full((num_keys + queries.shape[0],), num_keys, dtype=torch.int64, device=keys.device)
    row_of_unique = row_of_unique.index_put((unique_id[:num_keys],), torch.arange(num_keys, device=keys.device))
    return row_of_unique[unique_id[num_keys:]]


def _distinct_sites(linear: Tensor, num_cells: int, site_index: SiteIndex) -> tuple[Tensor, Tensor]:
    """(distinct sites ascending, index of each entry's site) for sites in [0, num_cells); see _lookup."""
    if not _use_dense(site_index, num_cells):
        return sorted_unique(linear)
    occupied = torch.zeros(num_cells, dtype=torch.int32, device=linear.device).index_put(
        (linear,), torch.ones_like(linear, dtype=torch.int32))
    rank = torch.cumsum(occupied, dim=0) - 1  # nonzero and cumsum both run in site order
    return torch.nonzero(occupied).squeeze(1), rank[linear].long()


def _batch_count(batch_size: int | torch.SymInt | Tensor) -> int | torch.SymInt:
    """The batch size as a size: mmdet3d's MVX detectors pass a tensor (coors[-1, 0] + 1) in eager runs; a symbolic
    one (PartA2's bbox head batches its RoIs, a dynamic count) stays symbolic rather than specialize the graph."""
    return batch_size if isinstance(batch_size, (int, torch.SymInt)) else int(batch_size)


def conv_output_size(spatial_shape: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """mmcv's get_conv_output_size."""
    return [(size + 2 * pad - dil * (k - 1) - 1) // st + 1
            for size, k, st, pad, dil in zip(spatial_shape, kernel_size, stride, padding, dilation)]


def subm_rulebook(indices: Tensor, batch_size: int, spatial_shape: Sequence[int], kernel_size: Sequence[int],
                  dilation: Sequence[int], site_index: SiteIndex = "sort") -> Rulebook:
    """Submanifold rulebook: output sites are the input sites; neighbour at ``o - kernel_size // 2 + k * dilation``."""
    site_index = site_index if _fixed_grid(spatial_shape) else "sort"
    indices64 = indices.long()
    offsets = _kernel_offsets(kernel_size, indices.device)
    half = torch.tensor([k // 2 for k in kernel_size], device=indices.device)
    dil = torch.tensor(list(dilation), device=indices.device)
    extent = _extent_tensor(spatial_shape, indices.device)
    neighbor_coords = indices64[:, None, 1:] - half + offsets * dil  # (N, K, ndim)
    inside = ((neighbor_coords >= 0) & (neighbor_coords < extent)).all(dim=2)
    queries = _linear(indices64[:, None, 0], neighbor_coords, spatial_shape)
    queries = torch.where(inside, queries, torch.full_like(queries, -1))
    keys = _linear(indices64[:, 0], indices64[:, 1:], spatial_shape)
    # Only dense tables need the cell count; the sort also serves batch sizes that are data-dependent
    # (dynamic-voxelization VoxelNet passes coors[-1, 0] + 1).
    num_cells = _batch_count(batch_size) * math.prod(spatial_shape) if site_index == "dense" else 0
    neighbors = _lookup(keys, queries.reshape(-1), num_cells, site_index).reshape(queries.shape)
    return Rulebook(indices, indices, neighbors, list(spatial_shape), list(spatial_shape))


def conv_rulebook(indices: Tensor, batch_size: int, spatial_shape: Sequence[int], kernel_size: Sequence[int],
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  site_index: SiteIndex = "sort") -> Rulebook:
    """Regular sparse-conv rulebook: every output site reached by an active input, sorted by linear index."""
    indices64 = indices.long()
    out_shape = conv_output_size(spatial_shape, kernel_size, stride, padding, dilation)
    offsets = _kernel_offsets(kernel_size, indices.device)
    kernel_volume = offsets.shape[0]
    st = torch.tensor(list(stride), device=indices.device)
    numerator = (indices64[:, None, 1:] + torch.tensor(list(padding), device=indices.device)
                 - offsets * torch.tensor(list(dilation), device=indices.device))  # (N, K, ndim) = o * stride
    out_coords = torch.div(numerator, st, rounding_mode="floor")
    reachable = ((numerator % st == 0) & (out_coords >= 0)
                 & (out_coords < _extent_tensor(out_shape, indices.device))).all(dim=2)
    pair = torch.nonzero(reachable.reshape(-1)).squeeze(1)  # flat (input row, offset) pairs that hit a site
    in_row = pair // kernel_volume
    offset = pair % kernel_volume
    out_linear = _linear(indices64[in_row, 0], out_coords.reshape(-1, len(kernel_size))[pair], out_shape)
    fixed_grid = _fixed_grid(out_shape)
    num_cells = _batch_count(batch_size) * math.prod(out_shape) if fixed_grid else 0
    unique_linear, out_row = _distinct_sites(out_linear, num_cells, site_index if fixed_grid else "sort")
    num_out = unique_linear.shape[0]
    # Bound the site count. Without a bound torch.export takes the candidate count (27x the input's int64 bound),
    # and torch.onnx fails to write that overflowing bound into its runtime assertion.
    if fixed_grid:
        torch._check(num_out <= num_cells)
    else:  # a data-dependent grid (MinkUNet): each input site reaches at most `reach` output sites
        reach = math.prod(-(-k // (st // math.gcd(st, dil))) for k, st, dil in zip(kernel_size, stride, dilation))
        torch._check(num_out <= indices.shape[0] * reach)
        # And below 2**31, as mmcv's int32 rulebooks index sites: otherwise the next submanifold conv's lookup (27x
        # this count) overflows int64 in the same assertion.
        torch._check(num_out < 2**31)
    # And at least one site (the SparseSequential patch asserts the same): BatchNorm1d after a conv guards on an
    # empty input, which torch.export cannot decide for an unbacked count (Cylinder3D's blocks).
    torch._check(num_out >= 1)
    neighbors = torch.full((num_out * kernel_volume,), indices.shape[0], dtype=torch.int64, device=indices.device)
    neighbors = neighbors.index_put((out_row * kernel_volume + offset,), in_row).reshape(num_out, kernel_volume)
    out_indices = _delinearize(unique_linear, out_shape).to(indices.dtype)
    return Rulebook(indices, out_indices, neighbors, list(spatial_shape), out_shape)


def inverse_neighbors(rulebook: Rulebook) -> Tensor:
    """(num_in, K) table of the paired convolution's output rows: the rulebook read backwards (mmcv inverse=True)."""
    num_in = rulebook.in_indices.shape[0]
    num_out, kernel_volume = rulebook.neighbors.shape
    offset = torch.arange(kernel_volume, device=rulebook.neighbors.device).expand(num_out, kernel_volume)
    out_row = torch.arange(num_out, device=rulebook.neighbors.device)[:, None].expand(num_out, kernel_volume)
    # Absent pairs point at row num_in, which lands in one spare slot cut off below.
    slot = (rulebook.neighbors * kernel_volume + offset).reshape(-1)
    table = torch.full((num_in * kernel_volume + kernel_volume,), num_out, dtype=torch.int64,
                       device=rulebook.neighbors.device)
    table = table.index_put((slot,), out_row.reshape(-1))
    return table[:num_in * kernel_volume].reshape(num_in, kernel_volume)


def gather_gemm(features: Tensor, neighbors: Tensor, weight: Tensor) -> Tensor:
    """sum_k features[neighbors[:, k]] @ weight[k], as one gather and one GEMM (absent rows read a zero row)."""
    kernel_volume, in_channels, out_channels = weight.shape
    padded = torch.cat([features, features.new_zeros((1, in_channels))])
    # Advanced indexing, not index_select on the flattened table: AOTInductor (torch 2.13) miscompiles the latter's
    # reshape when the row count is data-dependent.
    gathered = padded[neighbors].reshape(neighbors.shape[0], kernel_volume * in_channels)
    return gathered @ weight.reshape(kernel_volume * in_channels, out_channels)


def _module_rulebook(module: nn.Module, input: Any, spatial_shape: list[int], kernel_size: list[int],
                     site_index: SiteIndex) -> Rulebook:
    """A new rulebook for a sparse conv or pool module's geometry (its mmcv attributes) on the input's sites."""
    ndim = module.ndim
    if module.subm:
        return subm_rulebook(input.indices, input.batch_size, spatial_shape, kernel_size,
                             _as_list(module.dilation, ndim), site_index)
    return conv_rulebook(input.indices, input.batch_size, spatial_shape, kernel_size, _as_list(module.stride, ndim),
                         _as_list(module.padding, ndim), _as_list(module.dilation, ndim), site_index)


def sparse_conv_forward(module: nn.Module, input: Any, site_index: SiteIndex = "sort") -> Any:
    """Forward of an mmcv ``SparseConvolution`` (or this module's classes) on a sparse-conv tensor.

    Reads the module's mmcv attributes (ndim, kernel_size, stride, padding, dilation, subm, inverse, transposed,
    indice_key, weight (*kernel, C_in, C_out), bias) and returns a tensor of the input's type, sharing its
    ``indice_dict`` so that later layers reuse rulebooks by ``indice_key`` as in mmcv. ``site_index`` picks how
    rulebooks find active sites (see ``_lookup``); both give the same rulebook.
    """
    if module.transposed:
        raise NotImplementedError("transposed sparse convolution (SparseConvTranspose3d) is not implemented")
    ndim = module.ndim
    kernel_size = _as_list(module.kernel_size, ndim)
    spatial_shape = _grid_extents(input.spatial_shape)
    in_channels, out_channels = module.weight.shape[-2:]
    weight = module.weight.reshape(-1, in_channels, out_channels)

    if math.prod(kernel_size) == 1:
        # mmcv's 1x1 shortcut: a dense matmul on the same sites, whatever the stride.
        features = input.features @ weight[0]
        out_indices, out_shape = input.indices, spatial_shape
    else:
        rulebook = input.find_indice_pair(module.indice_key)
        if module.inverse:
            if not isinstance(rulebook, Rulebook):
                raise KeyError(f"inverse conv needs the rulebook of its paired conv under indice_key "
                               f"{module.indice_key!r}")
            neighbors = inverse_neighbors(rulebook)
            out_indices, out_shape = rulebook.in_indices, rulebook.in_spatial_shape
        else:
            if rulebook is None:
                rulebook = _module_rulebook(module, input, spatial_shape, kernel_size, site_index)
                input.indice_dict[module.indice_key] = rulebook
            neighbors = rulebook.neighbors
            out_indices, out_shape = rulebook.out_indices, rulebook.out_spatial_shape
        if neighbors.shape[1] != weight.shape[0]:
            # A rulebook cached under the same indice_key by a conv of another kernel (Cylinder3D shares keys
            # between 1x3x3, 3x1x3 and 3x3x3 convs). mmcv reuses it as is: its kernel loops over the cached
            # offsets and reads filters[0 .. cached volume - 1].
            if neighbors.shape[1] > weight.shape[0]:
                raise ValueError(f"indice_key {module.indice_key!r}: the cached rulebook has {neighbors.shape[1]} "
                                 f"kernel offsets, more than this conv's {weight.shape[0]} filters")
            weight = weight[: neighbors.shape[1]]
        features = gather_gemm(input.features, neighbors, weight)
    if module.bias is not None:
        features = features + module.bias
    output = type(input)(features, out_indices, out_shape, input.batch_size)
    output.indice_dict = input.indice_dict
    output.grid = getattr(input, "grid", None)
    return output


def sparse_maxpool_forward(module: nn.Module, input: Any, site_index: SiteIndex = "sort") -> Any:
    """Forward of an mmcv ``SparseMaxPool`` (or this module's class): the conv rulebook of the pool's geometry, then
    per output site the channel-wise max over its active inputs.

    mmcv's kernel starts every output at zero and keeps ``max(out, in)``, so a site whose inputs are all negative
    gives 0, not their max; this does the same (absent inputs read a zero row, then a floor at 0). Like mmcv, the
    pool neither reads nor stores a rulebook under an ``indice_key``.
    """
    spatial_shape = _grid_extents(input.spatial_shape)
    rulebook = _module_rulebook(module, input, spatial_shape, _as_list(module.kernel_size, module.ndim), site_index)
    padded = torch.cat([input.features, input.features.new_zeros((1, input.features.shape[1]))])
    features = padded[rulebook.neighbors].amax(dim=1).clamp(min=0)
    output = type(input)(features, rulebook.out_indices, rulebook.out_spatial_shape, input.batch_size)
    output.indice_dict = input.indice_dict
    output.grid = getattr(input, "grid", None)
    return output


def _takes_sparse_tensor(layer: nn.Module) -> bool:
    # mmcv's test is isinstance(layer, mmcv SparseModule); matching the base's name keeps mmcv optional.
    return isinstance(layer, (SparseConvolution, SparseMaxPool)) or any(
        base.__name__ == "SparseModule" for base in type(layer).__mro__)


def sparse_sequential_forward(sequential: nn.Module, input: Any) -> Any:
    """Forward of mmcv's ``SparseSequential`` without its ``if input.indices.shape[0] != 0`` check.

    After a strided sparse conv the site count is data-dependent (unbacked under torch.export), and that check
    stops the export. Here a known size of zero still skips the layer, as in mmcv; an unbacked size is assumed
    non-zero and asserted at run time (batch norm would otherwise guard on ``numel == 0``), so an exported graph
    needs at least one active site after every strided convolution.
    """
    for layer in sequential._modules.values():
        if _takes_sparse_tensor(layer):
            input = layer(input)
        elif hasattr(input, "indice_dict"):
            num_sites = input.features.shape[0]
            if guard_or_true(num_sites != 0):
                torch._check(num_sites > 0)
                input.features = layer(input.features)
        else:
            input = layer(input)
    return input


class SparseConvolution(nn.Module):
    """mmcv.ops.SparseConvolution's constructor and parameters (weight (*kernel, C_in, C_out)), exportable forward."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True, subm: bool = False,
                 output_padding: int | Sequence[int] = 0, transposed: bool = False, inverse: bool = False,
                 indice_key: str | None = None, fused_bn: bool = False) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError("mmcv sparse convolution supports groups=1 only")
        self.ndim = ndim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _as_list(kernel_size, ndim)
        self.stride = _as_list(stride, ndim)
        self.padding = _as_list(padding, ndim)
        self.dilation = _as_list(dilation, ndim)
        self.output_padding = _as_list(output_padding, ndim)
        if any(s != 1 and d != 1 for s, d in zip(self.stride, self.dilation)):
            raise ValueError("mmcv sparse convolution does not support stride and dilation both > 1 on one axis")
        self.groups = groups
        self.subm = subm
        self.transposed = transposed
        self.inverse = inverse
        self.indice_key = indice_key
        self.fused_bn = fused_bn
        self.weight = nn.Parameter(torch.empty(*self.kernel_size, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mmcv's init: kaiming on the HWIO weight, bias from its fan-in.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Any) -> Any:
        return sparse_conv_forward(self, input)


class SparseConv3d(SparseConvolution):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                 indice_key: str | None = None) -> None:
        super().__init__(3, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         indice_key=indice_key)


class SubMConv3d(SparseConvolution):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                 indice_key: str | None = None) -> None:
        super().__init__(3, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, True,
                         indice_key=indice_key)


class SparseInverseConv3d(SparseConvolution):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 indice_key: str | None = None, bias: bool = True) -> None:
        super().__init__(3, in_channels, out_channels, kernel_size, bias=bias, inverse=True, indice_key=indice_key)


class SparseMaxPool(nn.Module):
    """mmcv.ops.SparseMaxPool's constructor (no parameters), exportable forward."""

    def __init__(self, ndim: int, kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, subm: bool = False) -> None:
        super().__init__()
        self.ndim = ndim
        self.kernel_size = _as_list(kernel_size, ndim)
        self.stride = _as_list(stride, ndim)
        self.padding = _as_list(padding, ndim)
        self.dilation = _as_list(dilation, ndim)
        self.subm = subm

    def forward(self, input: Any) -> Any:
        return sparse_maxpool_forward(self, input)


class SparseMaxPool3d(SparseMaxPool):
    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1) -> None:
        super().__init__(3, kernel_size, stride, padding, dilation)
