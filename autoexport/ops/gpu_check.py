"""Compare autoexport.ops with mmcv's CUDA kernels on a GPU and print one table row per op.

    python -m autoexport.ops.gpu_check                  # mmcv's CUDA ops as the reference when importable
    python -m autoexport.ops.gpu_check --reference cpu  # no mmcv: the library on CUDA against itself on CPU

Index outputs are compared exactly (mismatching elements are counted). Where mmcv breaks distance ties in a
thread-dependent order, a mismatch passes only if it is a tie: furthest point sampling may part at a step whose
two candidates are equally far from the common prefix, knn may order neighbours of equal distance differently
(distances recomputed on the CPU, equal within 1e-6 relative, the GPU's fused multiply-adds). Float outputs
report the max abs difference. Sparse-conv outputs are compared after sorting sites by linear index. Timings are
medians of ``--repeat`` synchronised runs; in ``--reference cpu`` mode the reference column is the CPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from autoexport import ops
from autoexport.ops import deform_conv as dc
from autoexport.ops import paconv as pc
from autoexport.ops import point_sample as ps
from autoexport.ops import points_in_boxes as pib
from autoexport.ops import roi_align as ra
from autoexport.ops import scatter as sc
from autoexport.ops import sparse_conv as spc
from autoexport.ops import voxelize as vx

KITTI_RANGE = [0, -39.68, -3, 69.12, 39.68, 1]


@dataclass
class Check:
    name: str
    make_inputs: Callable[[torch.device], tuple]
    ours: Callable[..., Any]
    mmcv: Callable[..., Any] | None  # None: no mmcv counterpart worth calling (compared against CPU only)
    compare: Callable[[Any, Any, tuple], tuple[str, bool]]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cloud(batch: int, count: int, seed: int, device: torch.device, scale: float = 4.0) -> torch.Tensor:
    return (torch.rand(batch, count, 3, generator=_generator(seed)) * scale).to(device)


def _lidar(count: int, seed: int, device: torch.device) -> torch.Tensor:
    points = torch.rand(count, 4, generator=_generator(seed)) * torch.tensor([80, 90, 6, 1]) \
        + torch.tensor([-5, -45, -4, 0])
    return points.to(device)


def _boxes(count: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = _generator(seed)
    centers = torch.rand(1, count, 3, generator=generator) * torch.tensor([60.0, 70, 2]) + torch.tensor([0, -35, -3])
    sizes = torch.rand(1, count, 3, generator=generator) * torch.tensor([6.0, 3, 2]) + 0.5
    yaw = (torch.rand(1, count, 1, generator=generator) - 0.5) * 6.28
    return torch.cat([centers, sizes, yaw], dim=2).to(device)


def _points_in(boxes: torch.Tensor, per_box: int, seed: int) -> torch.Tensor:
    jitter = (torch.rand(*boxes.shape[:2], per_box, 3, generator=_generator(seed)).to(boxes.device) - 0.5) \
        * boxes[:, :, None, 3:6] * 1.6
    return (boxes[:, :, None, :3] + jitter).reshape(boxes.shape[0], -1, 3).contiguous()


def _sparse_sites(count: int, seed: int, device: torch.device, shape=(41, 400, 352), batch: int = 2):
    volume = shape[0] * shape[1] * shape[2]
    linear = torch.randperm(batch * volume, generator=_generator(seed))[:count]
    indices = torch.stack([linear // volume, (linear // (shape[1] * shape[2])) % shape[0],
                           (linear // shape[2]) % shape[1], linear % shape[2]], dim=1).int()
    return torch.randn(count, 16, generator=_generator(seed + 1)).to(device), indices.to(device), list(shape), batch


def _stacked_cloud(device: torch.device) -> tuple:
    """PV-RCNN's stacked layout: samples of 9000, 16384 and 700 points stacked row-wise, 1024, 512 and 64 centres
    (some outside every ball), int32 counts."""
    counts = [9000, 16384, 700]
    xyz = torch.cat([_cloud(1, n, 40 + i, device)[0] for i, n in enumerate(counts)]).contiguous()
    centers = torch.cat([_cloud(1, m, 50 + i, device, scale=4.5)[0] for i, m in enumerate([1024, 512, 64])])
    as_counts = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return xyz, centers.contiguous(), as_counts(counts), as_counts([1024, 512, 64])


def _stacked_grouping_inputs(device: torch.device) -> tuple:
    """Features of _stacked_cloud's points grouped by its ball query (empty balls pointed at row 0, as mmdet3d's
    StackQueryAndGroup does)."""
    xyz, centers, counts, center_counts = _stacked_cloud(device)
    idx = ps.stack_ball_query(0.4, 32, xyz, centers, counts, center_counts)
    idx = torch.where(idx[:, :1] < 0, torch.zeros_like(idx), idx)
    features = torch.randn(xyz.shape[0], 32, generator=_generator(57)).to(device)
    return features, idx.contiguous(), counts, center_counts


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def exact(actual: Any, expected: Any, _inputs: tuple) -> tuple[str, bool]:
    """Integer outputs equal, float outputs within 1e-4 (atomics and FMA reorder sums on the GPU)."""
    parts, ok = [], True
    for got, want in zip(_as_tuple(actual), _as_tuple(expected)):
        got, want = got.cpu(), want.cpu()
        if got.shape != want.shape:
            return f"shape {tuple(got.shape)} vs {tuple(want.shape)}", False
        if want.is_floating_point():
            diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
            parts.append(f"max abs {diff:.1e}")
            ok &= diff <= 1e-4 * max(1.0, want.abs().max().item() if want.numel() else 1.0)
        else:
            mismatched = int((got.long() != want.long()).sum())
            parts.append(f"{mismatched}/{want.numel()} idx differ")
            ok &= mismatched == 0
    return ", ".join(parts), ok


def _tied(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs() <= 1e-6 * torch.maximum(a.abs(), torch.ones_like(a))).all())


def fps_compare(actual: Any, expected: Any, inputs: tuple) -> tuple[str, bool]:
    """Exact picks, or else sequences that part at a tie: both next picks equally far from the common prefix."""
    points = inputs[0].cpu()
    actual, expected = actual.long().cpu(), expected.long().cpu()
    diverged = []
    for b in range(expected.shape[0]):
        differ = torch.nonzero(actual[b] != expected[b]).flatten()
        if len(differ) == 0:
            continue
        step = int(differ[0])
        nearest = ps._square_distance(points[b:b + 1, expected[b, :step]], points[b:b + 1])[0].amin(dim=0)
        if not _tied(nearest[actual[b, step]], nearest[expected[b, step]]):
            return f"sample {b} parts at step {step} without a tie", False
        diverged.append(step)
    if not diverged:
        return f"0/{expected.numel()} idx differ", True
    return f"{len(diverged)} samples part at tied steps {diverged}", True


def knn_compare(actual: Any, expected: Any, inputs: tuple) -> tuple[str, bool]:
    """Exact indices, or else the same ascending neighbour distances (ties may be ordered differently)."""
    _, xyz, centers = inputs
    distances = ps._square_distance(centers.cpu(), xyz.cpu())  # (B, M, N)
    actual, expected = actual.long().cpu(), expected.long().cpu()
    mismatched = int((actual != expected).sum())
    if mismatched == 0:
        return f"0/{expected.numel()} idx differ", True
    got = torch.gather(distances, 2, actual.transpose(1, 2))
    want = torch.gather(distances, 2, expected.transpose(1, 2))
    diff = (got - want).abs().max().item()
    return f"{mismatched}/{expected.numel()} idx differ, neighbour distances differ by {diff:.1e}", _tied(got, want)


def sorted_sparse(actual: Any, expected: Any, _inputs: tuple) -> tuple[str, bool]:
    """(features, indices) pairs compared after ordering both by linear site index."""
    def ordered(result):
        features, indices = result[0].cpu(), result[1].cpu().long()
        key = indices[:, 0]
        for column in range(1, indices.shape[1]):
            key = key * (int(indices[:, column].max()) + 1) + indices[:, column]
        order = torch.argsort(key)
        return features[order], indices[order]
    (got_features, got_indices), (want_features, want_indices) = ordered(actual), ordered(expected)
    if got_indices.shape != want_indices.shape or not torch.equal(got_indices, want_indices):
        return f"sites differ: {tuple(got_indices.shape)} vs {tuple(want_indices.shape)}", False
    diff = (got_features - want_features).abs().max().item()
    return f"sites equal, max abs {diff:.1e}", diff <= 1e-4 * max(1.0, want_features.abs().max().item())


def _sparse_chain(library) -> list:
    """SubM -> strided conv -> inverse conv from mmcv.ops or autoexport.ops; one seed gives both the same weights."""
    torch.manual_seed(0)
    layers = [library.SubMConv3d(16, 32, 3, indice_key="subm1"),
              library.SparseConv3d(32, 32, 3, stride=2, padding=1, indice_key="down"),
              library.SparseInverseConv3d(32, 16, 3, indice_key="down")]
    return layers


def _minkunet_chain(library) -> list:
    """MinkUNet's spconv geometry: kernel-2 stride-2 down conv and its inverse (SparseChain's are kernel 3)."""
    torch.manual_seed(1)
    return [library.SubMConv3d(16, 32, 3, indice_key="subm1"),
            library.SparseConv3d(32, 32, 2, stride=2, indice_key="down"),
            library.SparseInverseConv3d(32, 16, 2, indice_key="down")]


def _data_grid(indices: torch.Tensor) -> tuple:
    """The grid the sites span, as MinkUNetBackbone computes it (coors.max + 1), as 0-d tensors."""
    return tuple((indices.max(0)[0][1:] + 1).unbind(0))


def _run_sparse(tensor_class, layers, features, indices, shape, batch):
    x = tensor_class(features, indices, shape, batch)
    a = layers[0](x)
    down = layers[1](a)
    up = layers[2](down)
    return (a.features, a.indices), (down.features, down.indices), (up.features, up.indices)


def _run_pool(tensor_class, pool, features, indices, shape, batch):
    pooled = pool(tensor_class(features, indices, shape, batch))
    return pooled.features, pooled.indices


def build_checks(device: torch.device, mmcv_ops: Any | None) -> list[Check]:
    return _point_op_checks(mmcv_ops) + _voxel_roi_and_conv_checks(mmcv_ops) + _sparse_checks(device, mmcv_ops)


def _point_op_checks(mmcv_ops: Any | None) -> list[Check]:
    return [
        Check("furthest_point_sample", lambda d: (_cloud(4, 16384, 1, d), 1024),
              ps.furthest_point_sample, mmcv_ops and mmcv_ops.furthest_point_sample, fps_compare),
        Check("furthest_point_sample_with_dist",
              lambda d: (ps._square_distance(_cloud(2, 2048, 2, d), _cloud(2, 2048, 2, d)), 512),
              ps.furthest_point_sample_with_dist, mmcv_ops and mmcv_ops.furthest_point_sample_with_dist, exact),
        Check("ball_query", lambda d: (0.0, 0.4, 32, _cloud(4, 16384, 3, d), _cloud(4, 1024, 4, d)),
              ps.ball_query, mmcv_ops and mmcv_ops.ball_query, exact),
        Check("ball_query (stacked)", lambda d: (0.0, 0.4, 32, *_stacked_cloud(d)),
              ps.ball_query, mmcv_ops and mmcv_ops.ball_query, exact),
        Check("knn", lambda d: (16, _cloud(4, 8192, 5, d), _cloud(4, 1024, 6, d)),
              ps.knn, mmcv_ops and mmcv_ops.knn, knn_compare),
        Check("three_nn", lambda d: (_cloud(4, 4096, 7, d), _cloud(4, 1024, 8, d)),
              ps.three_nn, mmcv_ops and mmcv_ops.three_nn, exact),
        Check("three_interpolate",
              lambda d: (torch.randn(4, 64, 1024, generator=_generator(9)).to(d),
                         torch.randint(0, 1024, (4, 4096, 3), generator=_generator(10)).int().to(d),
                         torch.rand(4, 4096, 3, generator=_generator(11)).to(d)),
              ps.three_interpolate, mmcv_ops and mmcv_ops.three_interpolate, exact),
        Check("gather_points",
              lambda d: (torch.randn(4, 64, 8192, generator=_generator(12)).to(d),
                         torch.randint(0, 8192, (4, 1024), generator=_generator(13)).int().to(d)),
              ps.gather_points, mmcv_ops and mmcv_ops.gather_points, exact),
        Check("grouping_operation",
              lambda d: (torch.randn(4, 64, 8192, generator=_generator(14)).to(d),
                         torch.randint(0, 8192, (4, 1024, 32), generator=_generator(15)).int().to(d)),
              ps.grouping_operation, mmcv_ops and mmcv_ops.grouping_operation, exact),
        Check("grouping_operation (stacked)", _stacked_grouping_inputs,
              ps.grouping_operation, mmcv_ops and mmcv_ops.grouping_operation, exact),
        Check("points_in_boxes_part",
              lambda d: (torch.cat([_points_in(_boxes(100, 16, d), 100, 17), _cloud(1, 20000, 18, d, 60.0)], 1),
                         _boxes(100, 16, d)),
              pib.points_in_boxes_part, mmcv_ops and mmcv_ops.points_in_boxes_part, exact),
        Check("points_in_boxes_all",
              lambda d: (torch.cat([_points_in(_boxes(100, 19, d), 100, 20), _cloud(1, 20000, 21, d, 60.0)], 1),
                         _boxes(100, 19, d)),
              pib.points_in_boxes_all, mmcv_ops and mmcv_ops.points_in_boxes_all, exact),
    ]


def _voxel_roi_and_conv_checks(mmcv_ops: Any | None) -> list[Check]:
    checks = []
    for reduce in ("max", "mean"):
        checks.append(Check(
            f"dynamic_scatter ({reduce})",
            lambda d: (_lidar(60000, 22, d), vx.dynamic_voxelize(_lidar(60000, 22, d), [0.4, 0.4, 1.0], KITTI_RANGE)),
            lambda feats, coors, reduce=reduce: sc.dynamic_scatter(feats, coors, reduce),
            mmcv_ops and (lambda feats, coors, reduce=reduce: mmcv_ops.dynamic_scatter(feats, coors, reduce)), exact))
    for mode in ("max", "avg"):
        checks.append(Check(
            f"RoIAwarePool3d ({mode})",
            lambda d: (_boxes(64, 23, d)[0], _points_in(_boxes(64, 23, d), 200, 24)[0],
                       torch.randn(64 * 200, 16, generator=_generator(25)).to(d)),
            lambda rois, pts, feats, mode=mode: pib.RoIAwarePool3d(7, 128, mode)(rois, pts, feats),
            mmcv_ops and (lambda rois, pts, feats, mode=mode: mmcv_ops.RoIAwarePool3d(7, 128, mode)(rois, pts, feats)),
            exact))
    # PointRCNN's RoI pooling: 100 proposals, 16384 points, 512 samples per box (its test config).
    checks.append(Check(
        "RoIPointPool3d",
        lambda d: (torch.cat([_points_in(_boxes(100, 27, d), 100, 28), _cloud(1, 6384, 29, d, 60.0)], 1),
                   torch.randn(1, 16384, 16, generator=_generator(30)).to(d), _boxes(100, 27, d)),
        lambda pts, feats, boxes: pib.RoIPointPool3d(512)(pts, feats, boxes),
        mmcv_ops and (lambda pts, feats, boxes: mmcv_ops.RoIPointPool3d(512)(pts, feats, boxes)), exact))
    # PAConvCUDA's first S3DIS layer: 1024 centres with 32 neighbours among 4096 points, 8 weight matrices of 32
    # channels each; a few neighbour slots out of range (the kernel leaves them 0).
    checks.append(Check(
        "assign_score_withk", _paconv_inputs, pc.assign_score_withk,
        mmcv_ops and mmcv_ops.assign_score_withk, exact))
    # A Faster R-CNN FPN level (stride 4 of a 544 x 800 image, 256 channels) and 512 proposals from 4 to 400
    # pixels a side, the adaptive sampling grid (sampling_ratio 0) of ImVoteNet's RoI head.
    checks.append(Check(
        "RoIAlign (avg, aligned, adaptive grid)", _roi_align_inputs,
        lambda features, rois: ra.roi_align_function(features, rois, (7, 7), 0.25, 0, "avg", True),
        mmcv_ops and (lambda features, rois: mmcv_ops.roi_align(features, rois, (7, 7), 0.25, 0, "avg", True)),
        exact))
    checks.append(Check(
        "Voxelization (hard)", lambda d: (_lidar(120000, 26, d),),
        lambda points: vx.Voxelization([0.16, 0.16, 4], KITTI_RANGE, 32, 16000)(points),
        mmcv_ops and (lambda points: mmcv_ops.Voxelization([0.16, 0.16, 4], KITTI_RANGE, 32, 16000)(points)), exact))
    checks.append(Check(
        "DeformConv2d", lambda d: _deform_inputs(d, modulated=False),
        lambda x, offset, weight: dc.deform_conv2d(x, offset, weight, 1, 1),
        mmcv_ops and (lambda x, offset, weight: mmcv_ops.deform_conv2d(x, offset, weight, 1, 1)), exact))
    checks.append(Check(
        "ModulatedDeformConv2d", lambda d: _deform_inputs(d, modulated=True),
        lambda x, offset, mask, weight: dc.modulated_deform_conv2d(x, offset, mask, weight, None, 1, 1),
        mmcv_ops and (lambda x, offset, mask, weight: mmcv_ops.modulated_deform_conv2d(
            x, offset, mask, weight, None, 1, 1)), exact))
    return checks


def _sparse_checks(device: torch.device, mmcv_ops: Any | None) -> list[Check]:
    checks = []
    mmcv_layers = [layer.to(device) for layer in _sparse_chain(mmcv_ops)] if mmcv_ops is not None else None
    ours_by_device = {}
    for target in (device, torch.device("cpu")):
        layers = _sparse_chain(spc)  # same seed, same weights as mmcv's chain
        ours_by_device[target.type] = [layer.to(target) for layer in layers]
    for stage, label in enumerate(["SubMConv3d", "SparseConv3d", "SparseInverseConv3d"]):
        checks.append(Check(
            label, lambda d: _sparse_sites(30000, 31, d),
            lambda *args, stage=stage: _run_sparse(ops.SparseConvTensor, ours_by_device[args[0].device.type],
                                                   *args)[stage],
            mmcv_ops and (lambda *args, stage=stage: _run_sparse(mmcv_ops.SparseConvTensor, mmcv_layers,
                                                                 *args)[stage]),
            sorted_sparse))
    # MinkUNet: the grid is the data's (odd here, so the stride-2 conv drops the last row's sites); the library
    # takes it as 0-d tensors, mmcv as ints.
    mmcv_minkunet = [layer.to(device) for layer in _minkunet_chain(mmcv_ops)] if mmcv_ops is not None else None
    ours_minkunet = {target.type: [layer.to(target) for layer in _minkunet_chain(spc)]
                     for target in (device, torch.device("cpu"))}
    for stage, label in enumerate(["SubMConv3d", "SparseConv3d k2s2", "SparseInverseConv3d k2"]):
        checks.append(Check(
            f"MinkUNet {label} (data grid)", lambda d: _sparse_sites(30000, 35, d, shape=(41, 401, 353)),
            lambda features, indices, shape, batch, stage=stage: _run_sparse(
                ops.SparseConvTensor, ours_minkunet[features.device.type], features, indices, _data_grid(indices),
                batch)[stage],
            mmcv_ops and (lambda features, indices, shape, batch, stage=stage: _run_sparse(
                mmcv_ops.SparseConvTensor, mmcv_minkunet, features, indices,
                [int(size) for size in _data_grid(indices)], batch)[stage]),
            sorted_sparse))
    # PartA2's RoI head: SparseMaxPool3d(2, 2) on pooled RoI grids; here on the same 30k random sites.
    checks.append(Check(
        "SparseMaxPool3d", lambda d: _sparse_sites(30000, 33, d),
        lambda *args: _run_pool(ops.SparseConvTensor, spc.SparseMaxPool3d(2, 2), *args),
        mmcv_ops and (lambda *args: _run_pool(mmcv_ops.SparseConvTensor, mmcv_ops.SparseMaxPool3d(2, 2), *args)),
        sorted_sparse))
    return checks


def _roi_align_inputs(device: torch.device) -> tuple:
    generator = _generator(36)
    features = torch.randn(2, 256, 136, 200, generator=generator)
    sides = torch.exp(torch.empty(512, 2).uniform_(1.4, 6.0, generator=generator))
    corners = torch.rand(512, 2, generator=generator) * torch.tensor([800.0, 544.0])
    batch = torch.randint(0, 2, (512, 1), generator=generator).float()
    return features.to(device), torch.cat([batch, corners, corners + sides], dim=1).to(device)


def _paconv_inputs(device: torch.device) -> tuple:
    generator = _generator(32)
    scores = torch.softmax(torch.randn(2, 1024, 32, 8, generator=generator), dim=-1)
    points = torch.randn(2, 4096, 8, 32, generator=generator)
    centers = torch.randn(2, 4096, 8, 32, generator=generator)
    knn_idx = torch.randint(0, 4096, (2, 1024, 32), generator=generator)
    knn_idx[:, ::97, 31] = 4096
    return tuple(tensor.to(device) for tensor in (scores, points, centers, knn_idx))


def _deform_inputs(device: torch.device, modulated: bool) -> tuple:
    x = torch.randn(2, 64, 96, 160, generator=_generator(27)).to(device)
    offset = torch.randn(2, 18, 96, 160, generator=_generator(28)).to(device) * 2
    weight = (torch.randn(64, 64, 3, 3, generator=_generator(29)) * 0.05).to(device)
    if not modulated:
        return x, offset, weight
    return x, offset, torch.rand(2, 9, 96, 160, generator=_generator(30)).to(device), weight


def timed(function: Callable, inputs: tuple, repeat: int, device: torch.device) -> tuple[Any, float]:
    with torch.no_grad():
        result = function(*inputs)
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            function(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return result, statistics.median(times) * 1e3


def _cpu_inputs(inputs: tuple) -> tuple:
    return tuple(value.cpu() if torch.is_tensor(value) else value for value in inputs)


def _finite_or_none(value: float) -> float | None:
    return value if value == value else None  # NaN (the op raised) is not valid JSON


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reference", choices=["auto", "mmcv", "cpu"], default="auto",
                        help="mmcv's CUDA ops, or the library on CPU (auto: mmcv when importable)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="check names to run (default: all)")
    parser.add_argument("--json", help="also write the table as JSON to this path")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity, not TF32's
    torch.backends.cudnn.allow_tf32 = False
    mmcv_ops = None
    if args.reference in ("auto", "mmcv"):
        try:
            import mmcv.ops as mmcv_ops
        except ImportError:
            if args.reference == "mmcv":
                raise
    reference = f"mmcv {device.type.upper()}" if mmcv_ops is not None else "autoexport on CPU"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device {device_name}, torch {torch.__version__}, reference: {reference}\n")
    header = f"{'op':44} {'ours ms':>9} {'ref ms':>9}  {'result':6} comparison"
    print(header)
    print("-" * len(header))
    failures = 0
    rows = []
    for check in build_checks(device, mmcv_ops):
        if args.only and check.name not in args.only:
            continue
        inputs = check.make_inputs(device)
        try:
            ours, ours_ms = timed(check.ours, inputs, args.repeat, device)
            if mmcv_ops is not None and check.mmcv is not None:
                expected, reference_ms = timed(check.mmcv, inputs, args.repeat, device)
            else:
                expected, reference_ms = timed(check.ours, _cpu_inputs(inputs), 1, torch.device("cpu"))
            comparison, ok = check.compare(ours, expected, inputs)
        except Exception as error:  # report and go on: one broken op must not hide the others
            ours_ms = reference_ms = float("nan")
            comparison, ok = f"{type(error).__name__}: {str(error).splitlines()[0][:90]}", False
        failures += not ok
        print(f"{check.name:44} {ours_ms:9.2f} {reference_ms:9.2f}  {'ok' if ok else 'FAIL':6} {comparison}")
        rows.append({"op": check.name, "ours_ms": _finite_or_none(ours_ms),
                     "reference_ms": _finite_or_none(reference_ms), "ok": bool(ok),
                     "comparison": comparison})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "torch": torch.__version__, "reference": reference,
                       "mmcv": getattr(sys.modules.get("mmcv"), "__version__", None), "repeat": args.repeat,
                       "failures": failures, "rows": rows}, handle, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
