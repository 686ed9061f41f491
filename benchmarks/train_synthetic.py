"""Train a lidar detector briefly on synthesized scenes, to get weights whose scores mean something.

No trained mmdet3d checkpoint can be downloaded here, and random weights score every anchor near the prior
(~0.01-0.13), so comparing FP32 and INT8 *detections* on random weights compares noise around the score
threshold. A few hundred steps on synthetic scenes with known boxes (cars, pedestrians, cyclists on a ground
plane among walls and poles: autoexport.samples.synthesize_scene) give a model that separates objects from
clutter. The quantization benchmark uses it for the detection-agreement numbers; it is not a KITTI model.

    python3 benchmarks/train_synthetic.py --config pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class \
        --steps 300 --out benchmarks/results/pp_kitti_synthetic.pth
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Synthetic object kinds -> class names as KITTI and nuScenes configs spell them.
KIND_TO_CLASSES = {"car": ("Car", "car"), "pedestrian": ("Pedestrian", "pedestrian"), "cyclist": ("Cyclist", "bicycle")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1234, help="scene seed (the export samples use 0)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-at", type=int, nargs="*", default=[],
                        help="also save OUT with a .stepN suffix after these steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import warnings

    warnings.filterwarnings("ignore")
    from mmdet3d.structures import Det3DDataSample, LiDARInstance3DBoxes
    from mmengine.dataset import Compose, pseudo_collate
    from mmengine.structures import InstanceData

    from autoexport.analyze import build_model, init_random_weights, load_config
    from autoexport.configs import resolve_config
    from autoexport.samples import (_base_info, _write_cloud, point_cloud_format, synthesize_scene,
                                    test_pipeline_of)

    cfg = load_config(resolve_config(args.config))
    model = build_model(cfg, "cpu", 0, for_training=True)
    init_random_weights(model)
    model.requires_grad_(True)
    model.train()
    classes = list(cfg.class_names)
    pipeline_cfg = test_pipeline_of(cfg)
    fmt = point_cloud_format(cfg, pipeline_cfg)
    pipeline = Compose(pipeline_cfg)
    from mmdet3d.structures import get_box_type

    box_type, box_mode = get_box_type("LiDAR")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.3)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for step in range(args.steps):
            cloud, objects = synthesize_scene(rng, int(rng.integers(14000, 28000)), fmt)
            path = _write_cloud(Path(folder) / "scene.bin", cloud)
            packed = pipeline(copy.deepcopy(_base_info(path, fmt, box_type, box_mode, step)))
            kept = [(o, name) for o in objects for name in KIND_TO_CLASSES[o.kind] if name in classes]
            box_dim = 9 if fmt.dataset_type == "NuScenesDataset" else 7  # nuScenes boxes carry a velocity: 0 here
            boxes = torch.tensor([[*o.bottom_center, *o.size, o.yaw] + [0.0] * (box_dim - 7) for o, _ in kept],
                                 dtype=torch.float32).view(-1, box_dim)
            sample: Det3DDataSample = packed["data_samples"]
            sample.gt_instances_3d = InstanceData(
                bboxes_3d=LiDARInstance3DBoxes(boxes, box_dim=box_dim),
                labels_3d=torch.tensor([classes.index(name) for _, name in kept], dtype=torch.long))
            batch = model.data_preprocessor(pseudo_collate([packed]), True)
            losses = model.loss(batch["inputs"], batch["data_samples"])
            loss = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v)
                       for k, v in losses.items() if "loss" in k)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
            optimizer.step()
            scheduler.step()
            if step + 1 in args.save_at:
                _save(model, args, args.out.with_suffix(f".step{step + 1}.pth"), step + 1)
                model.train()
            if step % 10 == 0 or step + 1 == args.steps:
                print(f"step {step + 1}/{args.steps} loss {float(loss):.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    _save(model, args, args.out, args.steps)


def _save(model: torch.nn.Module, args: argparse.Namespace, path: Path, steps: int) -> None:
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(),
                "meta": {"trained_on": "synthesized scenes (autoexport.samples.synthesize_scene)",
                         "steps": steps, "config": args.config, "seed": args.seed}}, path)
    print(f"saved {path}", flush=True)


if __name__ == "__main__":
    main()
