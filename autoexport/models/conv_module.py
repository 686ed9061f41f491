"""mmcv's ConvModule: where its BatchNorm follows its conv, for folding before INT8 calibration."""

from __future__ import annotations

from ..knowledge import register


register("ConvModule", batchnorm_pair=lambda m: ("conv", m.norm_name)
         if m.with_norm and m.order.index("conv") < m.order.index("norm") else None)
