"""Static, padded input buffers for backends that want fixed shapes (IREE, TensorRT engines built for one size).

A padded artifact takes every input that carries the padded dimension at a fixed capacity, plus one count
input saying how many leading rows are real. Rows at and after the count are made inert inside the graph,
so a caller may leave anything in them. What "inert" means depends on the model, so the fill values are
registered by the module of the mmdet3d class that consumes the padded rows (ClassKnowledge.padding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from .manifest import Manifest
from .knowledge import KNOWLEDGE


@dataclass(frozen=True)
class PaddingRule:
    dim: str  # manifest dimension that gets a static capacity
    fills: dict[str, Callable[[int], list | float | int]]  # input path suffix -> fill value, given the batch size
    capacity_from: Callable[[torch.nn.Module], int | None]  # the model's own upper bound for the dimension
    spare_batch_row: bool  # export patches must give padded rows a canvas row of their own
    reason: str


@dataclass
class PaddingPlan:
    """How a padded artifact's inputs relate to the manifest's dynamic inputs."""

    dim: str
    capacity: int
    count_input: str  # name of the extra int64 scalar input: rows that are real
    axes: dict[str, int]  # input name -> axis that is padded to `capacity`
    fills: dict[str, list | float | int] = field(default_factory=dict)  # input name -> value of inert rows
    rule: str = ""
    spare_batch_row: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "PaddingPlan":
        return PaddingPlan(**data)

    def pad_feed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zero-pad the inputs to the capacity and add the count input; the graph makes the padding inert."""
        counts = {feed[name].shape[axis] for name, axis in self.axes.items()}
        if len(counts) != 1:
            raise ValueError(f"inputs disagree on {self.dim}: {sorted(counts)}")
        count = counts.pop()
        if count > self.capacity:
            raise ValueError(f"{count} {self.dim} exceed this artifact's static capacity of {self.capacity}; "
                             f"re-export with a larger --capacity")
        padded = dict(feed)
        for name, axis in self.axes.items():
            array = feed[name]
            widths = [(0, 0)] * array.ndim
            widths[axis] = (0, self.capacity - count)
            padded[name] = np.pad(array, widths)
        padded[self.count_input] = np.array(count, dtype=np.int64)
        return padded


def plan_padding(model: torch.nn.Module, manifest: Manifest, capacity: int | None = None) -> PaddingPlan | None:
    """A plan when the model has a registered rule covering every padded input, else None (stay dynamic)."""
    for module in model.modules():
        found = KNOWLEDGE.lookup(module, "padding")
        if found is None:
            continue
        class_name, rule = found
        axes = {t.name: axis for t in manifest.inputs for axis, dim in t.dynamic_dims.items() if dim == rule.dim}
        fills = {}
        for t in manifest.inputs:
            if t.name in axes:
                suffix = next((s for s in rule.fills if t.path.endswith(s)), None)
                if suffix is None:
                    return None  # an input the rule does not know how to pad: keep the artifact dynamic
                fills[t.name] = rule.fills[suffix](manifest.batch_size)
        if not axes:
            return None
        per_sample = capacity or rule.capacity_from(model)
        if not per_sample:
            return None
        total = per_sample if capacity else per_sample * manifest.batch_size
        return PaddingPlan(dim=rule.dim, capacity=int(total), count_input=rule.dim, axes=axes, fills=fills,
                           rule=f"{class_name}: {rule.reason}", spare_batch_row=rule.spare_batch_row)
    return None


class PaddedInputs(torch.nn.Module):
    """Front of a padded artifact: makes rows >= count inert, then calls the flat wrapper."""

    def __init__(self, wrapper: torch.nn.Module, manifest: Manifest, plan: PaddingPlan) -> None:
        super().__init__()
        self.wrapper = wrapper
        self.names = manifest.input_names
        self.plan = plan
        for name, value in plan.fills.items():
            spec = next(t for t in manifest.inputs if t.name == name)
            self.register_buffer(f"fill_{name}", torch.tensor(value, dtype=getattr(torch, spec.dtype)),
                                 persistent=False)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *inputs, count = args
        valid = torch.arange(self.plan.capacity, device=count.device) < count
        fixed = []
        for name, tensor in zip(self.names, inputs):
            axis = self.plan.axes.get(name)
            if axis is not None:
                shape = [1] * tensor.dim()
                shape[axis] = self.plan.capacity
                tensor = torch.where(valid.view(shape), tensor, getattr(self, f"fill_{name}"))
            fixed.append(tensor)
        return self.wrapper(*fixed)
