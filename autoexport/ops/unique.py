"""``torch.unique(values, sorted=True, return_inverse=True)`` for 1-D integer tensors, without ONNX ``Unique``.

torch.onnx writes ``torch.unique`` as ONNX ``Unique``, which IREE's ONNX importer has no conversion for (IREE 3.13:
"failed to legalize operation 'torch.operator' ... onnx.Unique"). The same result from a sort, a run-start mask and a
cumulative sum exports as TopK, CumSum, ScatterND and NonZero, which ONNX Runtime and IREE both run. The distinct
count stays data-dependent (an unbacked size under torch.export), as it is with ``torch.unique``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sorted_unique", "sorted_runs"]


def sorted_runs(values: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(distinct values ascending, index of each value's distinct value, the sorting permutation, the distinct
    value of each sorted position) for 1-D int64 ``values``: sorted positions form one run per distinct value."""
    ordered, order = torch.sort(values)
    # A gather, not ordered[:-1]: slicing a data-dependent (unbacked) length makes torch.export guard on it.
    positions = torch.arange(ordered.shape[0], device=values.device)
    run_start = (ordered != ordered[(positions - 1).clamp(min=0)]) | (positions == 0)
    run_of_sorted = torch.cumsum(run_start.to(torch.int64), dim=0) - 1
    inverse = torch.zeros_like(run_of_sorted).index_put((order,), run_of_sorted)
    return ordered[run_start], inverse, order, run_of_sorted


def sorted_unique(values: Tensor) -> tuple[Tensor, Tensor]:
    """(distinct values ascending, index of each value's distinct value), for 1-D int64 ``values``."""
    unique, inverse, _, _ = sorted_runs(values)
    return unique, inverse
