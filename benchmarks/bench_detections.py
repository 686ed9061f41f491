"""Points in, boxes out: mmdet3d's inference_detector against a --scope detections export, on one scan file.

    python benchmarks/bench_detections.py --config CONFIG --export-dir DIR --points FILE [--checkpoint C] [--runs 10]
        [--json benchmarks/results/cpu_detections_<name>.json]

Eager is mmdet3d's own inference_detector on the file (load, test pipeline, data preprocessor with mmcv's
voxelization, network, predict_by_feat with mmcv's NMS). Exported is `autoexport.load(DIR).predict(FILE, backend)`:
the file read as the loader reads it, then one graph call. Every runtime is timed in the same process, interleaved
round by round, median and min-max over --runs calls after one warm-up; ratios are eager median / runtime median.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def _timed(call) -> float:  # noqa: ANN001
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--points", type=Path, required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import autoexport
    from autoexport.analyze import build_model, init_random_weights, load_config
    from autoexport.checkpoint import load_checkpoint_strict
    from autoexport.configs import resolve_config
    from mmdet3d.apis import inference_detector

    cfg = load_config(resolve_config(args.config))
    model = build_model(cfg, "cpu", 0)
    if args.checkpoint:
        load_checkpoint_strict(model, args.checkpoint, False)
    else:
        init_random_weights(model)
    model.cfg = cfg
    exported = autoexport.load(args.export_dir)
    calls = {"eager (inference_detector)": lambda: inference_detector(model, str(args.points))}
    for backend in ("pt2", "onnxruntime"):
        calls[backend] = lambda backend=backend: exported.predict(args.points, backend=backend)
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()  # warm-up: runtimes load their models and fill their caches
        for _ in range(args.runs):
            for name, call in calls.items():
                times[name].append(_timed(call))
    eager = statistics.median(times["eager (inference_detector)"])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    rows = [{"runtime": name, "median_ms": round(statistics.median(t), 2), "min_ms": round(min(t), 2),
             "max_ms": round(max(t), 2), "speedup_vs_eager": round(eager / statistics.median(t), 2)}
            for name, t in times.items()]
    print(f"points in, boxes out: {args.config} on {args.points.name} ({machine}, {args.runs} runs)")
    print(f"{'runtime':<28} {'median ms':>10} {'min-max ms':>16} {'x eager':>8}")
    for r in rows:
        print(f"{r['runtime']:<28} {r['median_ms']:>10.1f} {r['min_ms']:>7.1f}-{r['max_ms']:<8.1f} "
              f"{r['speedup_vs_eager']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "config": args.config, "points": args.points.name,
                                         "runs": args.runs, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
