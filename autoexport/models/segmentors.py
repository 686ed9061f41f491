"""EncoderDecoder3D (PointNet++, DGCNN, PAConv segmentors): the network on a batch of patches, the sliding
patches made on the host; the decode heads' one output."""

from __future__ import annotations

from typing import Any

import torch

from ..boundaries import TensorBoundary, default_output_name
from ..knowledge import register


def sliding_patches(model: Any, inputs: dict, data_samples: list, ordinal: int) -> dict:
    """EncoderDecoder3D's slide inference cuts the cloud into overlapping blocks of test_cfg.num_points points
    (random fill, so the RNG is seeded per sample) and runs the network on batches of them. The graph takes a
    batch of patches; sample k carries 2 + k of them, so the patch count is a dynamic dim (the host sends up to
    test_cfg.batch_size at once). Whole-scene mode passes the cloud as one patch."""
    points = inputs["points"]
    cfg = model.test_cfg
    if cfg.get("mode") != "slide":
        return {"patches": torch.stack(points)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ordinal)
        patches, _ = model._sliding_patch_generation(points[0], cfg.num_points, cfg.block_size, cfg.sample_rate,
                                                     cfg.use_normalized_coord)
    patches = patches.view(-1, cfg.num_points, patches.shape[-1])
    count = min(2 + ordinal, patches.shape[0])
    return {"patches": patches[:count].contiguous()}


def segmentor_patch_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """EncoderDecoder3D's network on a batch of patches (B, num_points, C): per-point class logits (B, K, N)."""
    # The decode heads ignore the metas; one per patch would turn the dynamic patch count into a Python int.
    return model.encode_decode(inputs["patches"], [sample.metainfo for sample in data_samples])


_SLIDE_HOST_SIDE = ("cut each cloud into patches with EncoderDecoder3D._sliding_patch_generation(points, "
                    "test_cfg.num_points, block_size, sample_rate, use_normalized_coord), run the graph on up to "
                    "test_cfg.batch_size patches at a time, and average each point's logits over the patches that "
                    "hold it (scatter_add by patch index, divide by bincount), as slide_inference does")


register("EncoderDecoder3D", boundary=TensorBoundary(segmentor_patch_forward, ("decode_head",),
                                                     host_inputs=sliding_patches, host_side=_SLIDE_HOST_SIDE))
# Segmentation decode heads (PointNet2Head, DGCNNHead, PAConvHead): one (B, num_classes, N) tensor.
register("Base3DDecodeHead", output_namer=lambda path: "seg_logits" if not path else default_output_name(path))
