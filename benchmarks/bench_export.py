"""Stage timings and eager / PT2 / ONNX Runtime / IREE llvm-cpu / AOTInductor latency per config (CPU),
printed as a table with each runtime's ratio to eager and IREE's ratio to ONNX Runtime.

    python benchmarks/bench_export.py [--configs NAME ...] [--runs 5] [--out-root /tmp/autoexport-bench]

Each config is exported once with `autoexport --backend iree --backend aoti` (timings come from its
metadata.json); latency is the median of --runs calls after one warm-up, on the stored held-out sample,
each call numpy in -> numpy out. IREE runs the padded static artifact (capacity = the voxel layer's max_voxels)
unless --capacity dynamic.
GPU numbers come from benchmarks/bench_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from autoexport.analyze import build_model, load_config
from autoexport.cli import main as autoexport_main
from autoexport.configs import resolve_config
from autoexport.result import ExportResult, artifact_runners
from autoexport.backends.eager import EagerRunner
from autoexport.backends.onnxruntime import OnnxRuntimeRunner
from autoexport.backends.pt2 import PT2Runner
from autoexport.backends.runner import Runner
from autoexport.wrap import build_wrapper

DEFAULT_CONFIGS = [
    "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class",
    "pointpillars_hv_secfpn_sbn-all_8xb4-2x_nus-3d",
    "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d",
]


def median_latency_ms(runner: Runner, feed: dict[str, np.ndarray], runs: int) -> float:
    runner.infer(feed)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.infer(feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_config(config: str, out_root: Path, runs: int, capacity: str) -> dict:
    out = out_root / config
    code = autoexport_main(["--config", config, "--output-dir", str(out), "--overwrite", "--backend", "iree",
                            "--backend", "aoti", "--capacity", capacity])
    if code != 0:
        return {"config": config, "error": f"autoexport exited {code}"}
    result = ExportResult.load(out)
    meta = result.metadata
    names = (result.manifest.input_names, result.manifest.output_names)
    model = build_model(load_config(resolve_config(meta["model_config"])), "cpu", 0)
    feed = result.inputs("heldout_0")
    lowered, _ = artifact_runners(result.artifacts, out, result.manifest)
    runners = [EagerRunner(build_wrapper(out / "wrapper.py", model), *names),
               PT2Runner.from_file(out / "model.pt2", *names), OnnxRuntimeRunner(out / "model.onnx", *names), *lowered]
    latency = {r.name: median_latency_ms(r, feed, runs) for r in runners}
    return {"config": config, "timings_s": meta["timings_s"], "latency_ms": latency,
            "num_voxels": int(feed[result.manifest.input_names[0]].shape[0])}


def print_table(rows: list[dict]) -> None:
    header = ["config", "analyze s", "torch.export s", "onnx s", "iree compile s", "aoti compile s", "voxels",
              "eager ms", "pt2 ms", "ort ms", "iree ms", "aoti ms", "ort/eager", "iree/eager", "aoti/eager", "iree/ort"]
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append([r["config"], r["error"]] + [""] * (len(header) - 2))
            continue
        t, lat = r["timings_s"], r["latency_ms"]
        iree, aoti, ort = lat["iree-llvm-cpu"], lat["aoti-cpu"], lat["onnxruntime"]
        lines.append([r["config"], f"{t['analyze']:.1f}", f"{t.get('torch_export_s', 0):.1f}",
                      f"{t.get('onnx_s', 0):.1f}", f"{t.get('lower_iree-llvm-cpu_s', 0):.1f}",
                      f"{t.get('lower_aoti-cpu_s', 0):.1f}", str(r["num_voxels"]), f"{lat['eager']:.0f}",
                      f"{lat['pt2']:.0f}", f"{ort:.0f}", f"{iree:.0f}", f"{aoti:.0f}", f"{ort / lat['eager']:.2f}",
                      f"{iree / lat['eager']:.2f}", f"{aoti / lat['eager']:.2f}", f"{iree / ort:.2f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out-root", type=Path, default=Path("/tmp/autoexport-bench"))
    parser.add_argument("--capacity", default="auto", help="IREE input shapes: auto (padded to the model's bound), "
                                                               "dynamic or N, as autoexport --capacity")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = [bench_config(c, args.out_root, args.runs, args.capacity) for c in args.configs]
    print(f"\nautoexport stage timings and latency (CPU: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, median of {args.runs} runs on the held-out sample)\n")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
