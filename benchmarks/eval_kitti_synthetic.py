"""mmdet3d's KittiMetric on the synthetic set's held-out split: eager PyTorch and exported models, side by side.

Every candidate sees the same held-out frames through the config's own test pipeline (KittiDataset, LoadPointsFromFile
from velodyne_reduced, PointsRangeFilter); its boxes go to mmdet3d's KittiMetric (3D and BEV AP by class and
difficulty, AP11 and AP40). Exported candidates are `--scope detections` directories (points in, boxes out), run
with autoexport.deploy on the backend named after `@`. Detection agreement of each candidate against the eager FP32
boxes: precision and recall at BEV IoU >= 0.5 with the same label (autoexport.fidelity.match_detections).

    python3 benchmarks/eval_kitti_synthetic.py --data data/kitti_synthetic_val \
        --checkpoint benchmarks/weights/pointpillars_kitti_synthetic.pth \
        --candidate int8-ort=/tmp/pp_int8@onnxruntime --json benchmarks/results/cpu_kitti_synthetic_fidelity.json

mmdet3d.evaluation imports the Lyft and nuScenes SDKs, create_data scikit-image: `bash benchmarks/setup_metrics.sh`.
On a machine without a GPU, the metric's rotated-box overlaps come from benchmarks/kitti_rotate_iou_cpu.py (the
same matrix as mmdet3d's numba.cuda kernel, in seconds where numba's CUDA simulator takes minutes);
`--iou-kernel mmdet3d` keeps the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# KITTI's evaluation computes rotated IoUs with a numba.cuda kernel; without a GPU, numba's CUDA simulator runs the
# same kernel in Python (set before mmdet3d imports numba).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

CLASSES = ("Car", "Pedestrian", "Cyclist")
Predict = Callable[[dict], Any]  # test-pipeline item -> autoexport.fidelity.Detections


def held_out_dataset(cfg: Any, data: Path) -> Any:
    from mmdet3d.registry import DATASETS

    dataset_cfg = cfg.test_dataloader.dataset.copy()
    dataset_cfg.update(data_root=f"{data.resolve()}/", ann_file="kitti_infos_val.pkl",
                       data_prefix=dict(pts="training/velodyne_reduced"), test_mode=True)
    return DATASETS.build(dataset_cfg)


def eager_model(cfg: Any, checkpoint: Path) -> torch.nn.Module:
    from autoexport.analyze import build_model
    from autoexport.checkpoint import read_checkpoint, state_dict_of

    model = build_model(cfg, "cpu", 0)
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in state_dict_of(read_checkpoint(checkpoint), checkpoint).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def eager_predict(model: torch.nn.Module) -> Predict:
    from autoexport.fidelity import mmdet3d_detections

    return lambda item: mmdet3d_detections(model, item["inputs"]["points"].numpy(), [item["data_samples"]], "cpu")


def exported_predict(spec: str) -> Predict:
    from autoexport import deploy
    from autoexport.fidelity import Detections

    directory, _, backend = spec.partition("@")
    model = deploy.load(directory)

    def predict(item: dict) -> Detections:
        found = model.predict(item["inputs"]["points"].numpy(), backend=backend or "pt2")
        return Detections(found.boxes[:, :7].astype(np.float64), found.scores.astype(np.float64),
                          found.labels.astype(np.int64))

    return predict


def run_candidate(name: str, predict: Predict, dataset: Any, ann_file: Path) -> tuple[dict, list, float]:
    from mmdet3d.evaluation.metrics import KittiMetric
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmengine.evaluator import Evaluator
    from mmengine.structures import InstanceData

    evaluator = Evaluator(KittiMetric(ann_file=str(ann_file), metric="bbox"))
    evaluator.dataset_meta = dataset.metainfo
    found, seconds = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        start = time.perf_counter()
        detections = predict(item)
        seconds.append(time.perf_counter() - start)
        found.append(detections)
        sample = item["data_samples"]
        sample.pred_instances_3d = InstanceData(
            bboxes_3d=LiDARInstance3DBoxes(torch.from_numpy(detections.boxes).float()),
            scores_3d=torch.from_numpy(detections.scores).float(), labels_3d=torch.from_numpy(detections.labels))
        sample.pred_instances = InstanceData()
        evaluator.process([sample])
        if (index + 1) % 50 == 0 or index + 1 == len(dataset):
            print(f"[eval] {name}: {index + 1}/{len(dataset)} frames", flush=True)
    start = time.perf_counter()
    metrics = evaluator.evaluate(len(dataset))
    print(f"[eval] {name}: KittiMetric took {time.perf_counter() - start:.1f} s", flush=True)
    return metrics, found, float(np.median(seconds) * 1000)


def ap_table(metrics: dict) -> dict:
    """{class: {AP40 3D/BEV easy/moderate/hard, AP11 3D moderate}} from KittiMetric's flat keys."""
    prefix = "Kitti metric/pred_instances_3d/KITTI/"
    table = {}
    for cls in CLASSES:
        row = {}
        for kind in ("3D", "BEV"):
            for level in ("easy", "moderate", "hard"):
                row[f"{kind}_AP40_{level}"] = round(metrics.get(f"{prefix}{cls}_{kind}_AP40_{level}_strict", float("nan")), 2)
        row["3D_AP11_moderate"] = round(metrics.get(f"{prefix}{cls}_3D_AP11_moderate_strict", float("nan")), 2)
        table[cls] = row
    return table


def agreement(reference: list, candidate: list) -> dict:
    from autoexport.fidelity import MatchCounts, match_detections

    total = MatchCounts()
    for ref, cand in zip(reference, candidate):
        total.add(match_detections(ref, cand))
    return {"reference_boxes": total.reference, "candidate_boxes": total.candidate, "matched": total.matched,
            "recall": None if total.recall is None else round(total.recall, 4),
            "precision": None if total.precision is None else round(total.precision, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class")
    parser.add_argument("--data", type=Path, required=True, help="benchmarks/synthetic_kitti.py output (--val-only)")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=DIR@BACKEND",
                        help="a --scope detections export to evaluate too")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--iou-kernel", choices=("auto", "mmdet3d"), default="auto",
                        help="auto: mmdet3d's numba.cuda kernel on a GPU, kitti_rotate_iou_cpu without one")
    args = parser.parse_args()

    from mmengine.config import Config

    from autoexport.configs import resolve_config

    from mmdet3d.utils import register_all_modules

    register_all_modules()  # mmdet3d.evaluation (KittiMetric) imports the SDKs of benchmarks/setup_metrics.sh
    cpu_iou = args.iou_kernel == "auto" and not os.path.exists("/dev/nvidia0")
    if cpu_iou:
        import kitti_rotate_iou_cpu  # beside this script

        kitti_rotate_iou_cpu.install()
    cfg = Config.fromfile(resolve_config(args.config))
    dataset = held_out_dataset(cfg, args.data)
    ann_file = args.data / "kitti_infos_val.pkl"
    candidates: dict[str, Predict] = {"pytorch-fp32": eager_predict(eager_model(cfg, args.checkpoint))}
    for spec in args.candidate:
        name, _, where = spec.partition("=")
        candidates[name] = exported_predict(where)
    rows, reference = {}, None
    for name, predict in candidates.items():
        metrics, found, median_ms = run_candidate(name, predict, dataset, ann_file)
        row = {"ap": ap_table(metrics), "median_ms_per_frame": round(median_ms, 1)}
        if reference is None:
            reference = found
        else:
            row["agreement_with_pytorch_fp32"] = agreement(reference, found)
            row["delta_car_3d_ap40_moderate"] = round(row["ap"]["Car"]["3D_AP40_moderate"]
                                                      - rows["pytorch-fp32"]["ap"]["Car"]["3D_AP40_moderate"], 2)
        rows[name] = row
        print(f"[eval] {name}: " + ", ".join(f"{c} 3D AP40 mod {row['ap'][c]['3D_AP40_moderate']}" for c in CLASSES)
              + f"; {median_ms:.0f} ms/frame", flush=True)
    result = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} threads)",
              "config": args.config, "checkpoint": str(args.checkpoint), "frames": len(dataset),
              "metric": "mmdet3d KittiMetric (bbox), strict IoU: Car 0.7, Pedestrian/Cyclist 0.5",
              "rotated_iou": "kitti_rotate_iou_cpu (shapely)" if cpu_iou else "mmdet3d numba.cuda kernel",
              "candidates": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["ap"] for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
