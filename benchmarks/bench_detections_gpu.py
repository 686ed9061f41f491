"""Points in, boxes out on a GPU: a --scope detections model.pt2 on CUDA, op by op and compiled by Inductor.

    # here: copy what one run needs (no mmdet3d on the GPU machine)
    mkdir -p gpu_bundle/det && cp -r OUT/metadata.json OUT/model.pt2 OUT/inputs OUT/reference gpu_bundle/det/
    # on the GPU machine: latency table and parity against the stored CPU eager outputs
    python benchmarks/bench_detections_gpu.py gpu_bundle/det --runs 50 --json $OUT/gpu_detections.json

Every call is one sample's points (host numpy) in and the padded detections back on the host, timed with
torch.cuda.synchronize around it; median and min-max of --runs after --warmup calls, both runtimes interleaved.
Parity: the filled rows' boxes, scores and labels against reference/<sample>.npz (the CPU eager graph), as a row set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import autoexport.ops  # noqa: F401 - registers the graph's custom ops (hard_voxelize, greedy_nms_keep)


def _on_cuda(program_path: Path) -> torch.nn.Module:
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(torch.export.load(program_path), "cuda").module()


def _call(module: torch.nn.Module, points: np.ndarray) -> list[np.ndarray]:
    outputs = module(torch.from_numpy(points).cuda())
    torch.cuda.synchronize()
    return [o.cpu().numpy() for o in outputs]


def _max_box_diff(got: list[np.ndarray], reference: dict[str, np.ndarray]) -> float:
    count = int(reference["num_detections"])
    if int(got[3]) != count:
        return float("inf")
    ref = np.concatenate([reference["boxes_3d"][:count], reference["scores_3d"][:count, None],
                          reference["labels_3d"][:count, None]], 1)
    out = np.concatenate([got[0][:count], got[1][:count, None], got[2][:count, None]], 1)
    order = np.lexsort(ref.T[::-1]), np.lexsort(out.T[::-1])  # same set in any order: sort rows the same way
    return float(np.abs(ref[order[0]] - out[order[1]]).max()) if count else 0.0


def _parity(got: list[np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """Count on the GPU, and the largest difference of the filled rows (inf when the counts differ)."""
    return {"gpu_detections": int(got[3]), "max_diff_vs_cpu_eager": _max_box_diff(got, reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tf32", action="store_true", help="let cuDNN convolutions use TF32 (off: plain fp32)")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = args.tf32

    eager = _on_cuda(args.bundle / "model.pt2")
    modules = {"pt2 on CUDA (op by op)": eager, "Inductor (torch.compile)": torch.compile(eager, dynamic=True)}
    samples = sorted(p.stem for p in (args.bundle / "inputs").glob("*.npz"))
    rows = []
    for sample in samples:
        points = np.load(args.bundle / "inputs" / f"{sample}.npz")["points"]
        reference = dict(np.load(args.bundle / "reference" / f"{sample}.npz"))
        times: dict[str, list[float]] = {name: [] for name in modules}
        for module in modules.values():
            for _ in range(args.warmup):
                _call(module, points)
        for _ in range(args.runs):
            for name, module in modules.items():
                start = time.perf_counter()
                _call(module, points)
                times[name].append((time.perf_counter() - start) * 1000.0)
        for name, module in modules.items():
            rows.append({"sample": sample, "points": len(points), "runtime": name,
                         "median_ms": round(statistics.median(times[name]), 3),
                         "min_ms": round(min(times[name]), 3), "max_ms": round(max(times[name]), 3),
                         "detections": int(reference["num_detections"]), **_parity(_call(module, points), reference)})
    device = torch.cuda.get_device_name(0)
    print(f"points in, boxes out on {device} (torch {torch.__version__}, TF32 {args.tf32}), median of {args.runs}")
    for r in rows:
        print(f"{r['sample']:<10} {r['points']:>6} pts  {r['runtime']:<26} {r['median_ms']:>8.2f} ms "
              f"({r['min_ms']:.2f}-{r['max_ms']:.2f})  {r['detections']:>3}/{r['gpu_detections']:>3} boxes CPU/GPU, "
              f"max diff {r['max_diff_vs_cpu_eager']:.2g}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "runs": args.runs,
                                         "warmup": args.warmup, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
