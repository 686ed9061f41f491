"""PAConv's kernel assembly (mmcv.ops.assign_score_withk) in PyTorch.

mmcv has only a CUDA kernel for it (csrc/common/cuda/assign_score_withk_cuda_kernel.cuh), which mmdet3d's
``PAConvCUDA`` calls. For every centre n, neighbour k and output channel o the kernel sums over the weight bank's M
matrices ``scores[b, n, k, m] * (points[b, idx[b, n, k], m, o] - centers[b, idx[b, n, 0], m, o])``: the first
neighbour is the centre. A neighbour index outside [0, N) leaves that output 0. The forward kernel ignores
``aggregate`` (the per-neighbour outputs are returned; PAConv reduces over K afterwards), and so does this one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["assign_score_withk"]


def assign_score_withk(scores: Tensor, point_features: Tensor, center_features: Tensor, knn_idx: Tensor,
                       aggregate: str = "sum") -> Tensor:
    """scores (B, npoint, K, M), point/center features (B, N, M, O), knn_idx (B, npoint, K) -> (B, O, npoint, K)."""
    if aggregate not in ("sum", "avg", "max"):
        raise ValueError(f"assign_score_withk: aggregate must be 'sum', 'avg' or 'max', not {aggregate!r}")
    batch, num_points, num_kernels, out_channels = point_features.shape
    _, num_centers, num_neighbours, _ = scores.shape
    index = knn_idx.to(torch.int64)
    valid = (index >= 0) & (index < num_points)
    # One flat gather per table (rows of M * O) instead of batched advanced indexing: a plain Gather in ONNX.
    batch_offset = (torch.arange(batch, device=index.device) * num_points)[:, None, None]
    rows = (index.clamp(0, num_points - 1) + batch_offset).reshape(-1)
    center_rows = (index[:, :, :1].clamp(0, num_points - 1) + batch_offset).reshape(-1)
    neighbours = point_features.reshape(batch * num_points, num_kernels, out_channels)[rows]
    centers = center_features.reshape(batch * num_points, num_kernels, out_channels)[center_rows]
    neighbours = neighbours.reshape(batch, num_centers, num_neighbours, num_kernels, out_channels)
    centers = centers.reshape(batch, num_centers, 1, num_kernels, out_channels)
    # (B, n, K, 1, M) @ (B, n, K, M, O): the sum over the weight bank as one batched matmul.
    assembled = (scores[..., None, :] @ (neighbours - centers)).squeeze(-2)
    assembled = torch.where(valid[..., None], assembled, torch.zeros_like(assembled))
    return assembled.permute(0, 3, 1, 2).contiguous()
