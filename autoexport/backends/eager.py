"""Eager PyTorch: the generated wrapper around the original mmdet3d model, the parity reference."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .runner import Feed, Runner


class TorchModuleRunner(Runner):
    """A torch module called on the feed's tensors, on one device."""

    def __init__(self, module: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str],
                 device: str = "cpu") -> None:
        super().__init__(input_names, output_names)
        self.module = module
        self.device = device

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        args = [torch.from_numpy(np.array(feed[n], copy=True)).to(self.device) for n in self.input_names]
        with torch.no_grad():
            outputs = self.module(*args)
        return self._named(outputs)


class EagerRunner(TorchModuleRunner):
    """The generated wrapper around the original, unpatched mmdet3d model: the parity reference."""

    name = "eager"
