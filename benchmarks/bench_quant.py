"""FP32 vs INT8 latency on CPU, in ONNX Runtime and IREE llvm-cpu, plus the INT8 fidelity numbers, per config.

    python benchmarks/bench_quant.py [--configs NAME ...] [--checkpoint NAME=PATH ...] [--runs 5]
        [--agreement-score-thr NAME=T ...]
        [--calib-samples 16] [--calib-data CONFIG=DIR ...] [--skip-layers CONFIG=PATTERN[,PATTERN] ...]
        [--eval-samples 20] [--out-root /tmp/autoexport-bench-quant] [--json FILE]

Each config is exported twice with autoexport (--precision fp32 and --precision int8, both with --backend iree);
latency is the median of --runs calls after one warm-up on the stored held-out sample, numpy in -> numpy out.
Fidelity (cosine, detection agreement) is read from the INT8 export's quant_report.json. FP16 vs FP32 on a GPU:
benchmarks/bench_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path

from autoexport.cli import main as autoexport_main
from autoexport.result import ExportResult

from bench_export import median_latency_ms

DEFAULT_CONFIGS = [
    "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class",
    "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d",
]


def bench(config: str, checkpoint: str | None, out_root: Path, runs: int, calib: int, evals: int,
          score_thr: str | None, calib_data: str | None = None, skip_layers: str | None = None) -> dict:
    row: dict = {"config": config, "checkpoint": checkpoint or "random weights"}
    if skip_layers:
        row["skip_layers"] = skip_layers.split(",")
    latency: dict[str, float] = {}
    for precision in ("fp32", "int8"):
        out = out_root / f"{config}.{precision}"
        args = ["--config", config, "--output-dir", str(out), "--overwrite", "--precision", precision,
                "--backend", "iree"]
        if checkpoint:
            args += ["--checkpoint", checkpoint]
        if precision == "int8":
            args += ["--calib-samples", str(calib), "--eval-samples", str(evals)]
            if calib_data:
                args += ["--calib-data", calib_data]
            if score_thr:
                args += ["--agreement-score-thr", score_thr]
            if skip_layers:
                args += ["--skip-layers", *skip_layers.split(",")]
        code = autoexport_main(args)
        if code != 0:
            row[f"{precision}_error"] = f"autoexport exited {code}"
            failed = out.parent / f"{out.name}.failed"
            if not failed.exists():
                continue
            out = failed
        result = ExportResult.load(out)
        runners, skipped = result.runners(["onnxruntime", "iree"])
        feed = result.inputs(result.sample_names()[-1])
        for runner in runners:
            latency[f"{runner.name}_{precision}_ms"] = round(median_latency_ms(runner, feed, runs), 1)
        for item in skipped:
            row[f"{item.runtime}_{precision}_skipped"] = item.reason
        if precision == "int8":
            report = json.loads((out / "quant_report.json").read_text())
            row["min_cosine"] = min(o["min_cosine"] for o in report["outputs"])
            row["per_output_min_cosine"] = {o["output"]: round(o["min_cosine"], 6) for o in report["outputs"]}
            row["detection_agreement"] = {k: v for k, v in (report.get("detection_agreement") or {}).items()
                                          if k != "per_sample"}
            row["onnxruntime_kernels"] = report.get("onnxruntime_kernels")
            row["held_out_samples"] = report["held_out_samples"]
    row.update(latency)
    for runtime in ("onnxruntime", "iree-llvm-cpu"):  # runner names
        fp32, int8 = latency.get(f"{runtime}_fp32_ms"), latency.get(f"{runtime}_int8_ms")
        if fp32 and int8:
            row[f"{runtime}_int8_speedup"] = round(fp32 / int8, 2)
    return row


def print_table(rows: list[dict]) -> None:
    header = f"{'config':<60} {'ORT fp32':>9} {'ORT int8':>9} {'x':>5} {'IREE fp32':>10} {'IREE int8':>10} {'x':>5} " \
             f"{'min cos':>8} {'det P/R':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        det = r.get("detection_agreement") or {}
        pr = f"{det.get('precision') or 0:.3f}/{det.get('recall') or 0:.3f}" if det else "-"
        print(f"{r['config'][:60]:<60} {r.get('onnxruntime_fp32_ms', '-'):>9} {r.get('onnxruntime_int8_ms', '-'):>9} "
              f"{r.get('onnxruntime_int8_speedup', '-'):>5} {r.get('iree-llvm-cpu_fp32_ms', '-'):>10} "
              f"{r.get('iree-llvm-cpu_int8_ms', '-'):>10} {r.get('iree-llvm-cpu_int8_speedup', '-'):>5} "
              f"{r.get('min_cosine', float('nan')):>8.5f} {pr:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--checkpoint", action="append", default=[], metavar="CONFIG=PATH")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-data", action="append", default=[], metavar="CONFIG=DIR",
                        help="the config's own point cloud files to calibrate on (the rest are held out)")
    parser.add_argument("--skip-layers", action="append", default=[], metavar="CONFIG=PATTERN[,PATTERN]",
                        help="layers the config's INT8 export keeps in float (autoexport --skip-layers)")
    parser.add_argument("--eval-samples", type=int, default=20)
    parser.add_argument("--agreement-score-thr", action="append", default=[], metavar="CONFIG=T",
                        help="detection agreement at this score threshold instead of the model's test_cfg")
    parser.add_argument("--out-root", type=Path, default=Path("/tmp/autoexport-bench-quant"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    thresholds = dict(item.split("=", 1) for item in args.agreement_score_thr)
    calib_data = dict(item.split("=", 1) for item in args.calib_data)
    skip_layers = dict(item.split("=", 1) for item in args.skip_layers)
    rows = [bench(c, checkpoints.get(c), args.out_root, args.runs, args.calib_samples, args.eval_samples,
                  thresholds.get(c), calib_data.get(c), skip_layers.get(c)) for c in args.configs]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "cpu_count": __import__("os").cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
