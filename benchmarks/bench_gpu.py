"""GPU parity and latency of an export: eager CUDA PyTorch, AOTInductor (CUDA) and IREE (cuda), on the export's
stored inputs. Three steps, because the GPU machine has torch but no mmcv/mmdet3d and takes at most 64 MiB:

    # here: a slim copy of the export (metadata, the artifacts one run needs, the stored inputs)
    python benchmarks/bench_gpu.py bundle OUT_DIR gpu_bundle/kitti --with iree-cuda
    # on the GPU machine (device tool): outputs as .npz and latencies as JSON into $OUT
    python benchmarks/bench_gpu.py run gpu_bundle/kitti --backends iree-cuda --out $OUT --runs 20
    # here: parity of the returned outputs against the stored eager CPU reference, merged into benchmarks/results/
    python benchmarks/bench_gpu.py collect OUT_DIR RETURNED_DIR --json benchmarks/results/gpu_<config>.json

"eager-cuda" is model.pt2's graph executed op by op by CUDA PyTorch (torch.export.load + move_to_device_pass):
the same aten ops mmdet3d's eager forward runs, without compilation; mmdet3d itself cannot run there.
Latency is the median of --runs calls after warm-up, each call numpy in -> numpy out (host copies included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout on the GPU machine

from autoexport.report import load_npz, save_npz  # noqa: E402
from autoexport.result import ExportResult  # noqa: E402

GPU_BACKENDS = ("eager-cuda", "aoti-cuda", "iree-cuda")


def bundle(export_dir: Path, target: Path, with_: list[str], samples: list[str]) -> None:
    if target.exists():
        shutil.rmtree(target)
    (target / "inputs").mkdir(parents=True)
    shutil.copy(export_dir / "metadata.json", target)
    for sample in samples:  # compressed: voxel buffers are mostly zero padding, and the transfer is capped
        np.savez_compressed(target / "inputs" / f"{sample}.npz", **load_npz(export_dir / "inputs" / f"{sample}.npz"))
    if {"eager-cuda", "aoti-cuda"} & set(with_):
        shutil.copy(export_dir / "model.pt2", target)
    if "iree-cuda" in with_:
        (target / "iree").mkdir()
        shutil.copy(export_dir / "iree" / "model.cuda.vmfb", target / "iree")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    print(f"bundle {target}: {size:.1f} MiB")


def _runner(name: str, result: ExportResult, work: Path):  # noqa: ANN202
    import torch

    from autoexport.backends import BACKENDS
    from autoexport.backends.aoti import AotiRunner, compile_package
    from autoexport.backends.pt2 import PT2Runner

    names = (result.manifest.input_names, result.manifest.output_names)
    if name == "eager-cuda":
        runner = PT2Runner.from_file(result.output_dir / "model.pt2", *names, device="cuda")
        runner.name = name
        return runner, 0.0
    if name == "aoti-cuda":
        start = time.perf_counter()
        compile_package(torch.export.load(str(result.output_dir / "model.pt2")), work / "model.cuda.pt2", "cuda")
        seconds = time.perf_counter() - start
        return AotiRunner(work / "model.cuda.pt2", *names, device="cuda", name=name), seconds
    artifact = next(a for a in result.artifacts if a.backend == name)
    return BACKENDS["iree"].runner(artifact, result.output_dir, result.manifest), artifact.compile_s


def run(bundle_dir: Path, backends: list[str], out: Path, runs: int, warmup: int, return_samples: list[str]) -> None:
    import torch

    from autoexport.verify import DEFAULT_TOLERANCES, compare_arrays

    # PyTorch runs CUDA convs in TF32 by default (10-bit mantissa): 9e-3 max abs on PointPillars, outside the
    # fp32 tolerance. The fp32 comparison turns it off; IREE and AOTInductor compute in fp32 too.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    result = ExportResult.load(bundle_dir)
    kept: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    out.mkdir(parents=True, exist_ok=True)
    rows = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tf32": False,
            "config": result.metadata["config_name"], "runs": runs, "warmup": warmup, "backends": {}}
    samples = sorted(p.stem for p in (bundle_dir / "inputs").glob("*.npz"))
    for name in backends:
        print(f"[{name}] building", flush=True)
        try:
            runner, compile_s = _runner(name, result, out)
        except Exception as err:  # noqa: BLE001 - one backend failing must not lose the others' numbers
            rows["backends"][name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            print(f"[{name}] failed: {rows['backends'][name]['error']}", flush=True)
            continue
        entry = {"compile_s": round(compile_s, 2), "latency_ms": {}}
        for sample in samples:
            feed = result.inputs(sample)
            outputs = runner.infer(feed)
            if sample in return_samples:  # what comes back is capped at 64 MiB: the rest is compared here
                save_npz(out / f"{name}.{sample}.npz", outputs)
            if name == "eager-cuda":
                kept[(name, sample)] = outputs
            elif ("eager-cuda", sample) in kept:
                expected = kept[("eager-cuda", sample)]
                metrics = [compare_arrays(expected[k], outputs[k], DEFAULT_TOLERANCES["fp32"]) for k in expected]
                entry.setdefault("parity_vs_eager_cuda_on_device", {})[sample] = {
                    "passed": all(m["passed"] for m in metrics), "max_abs": max(m["max_abs"] for m in metrics),
                    "min_cosine": min(m["cosine"] for m in metrics)}
            for _ in range(warmup):
                runner.infer(feed)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                runner.infer(feed)
                times.append((time.perf_counter() - start) * 1000)
            entry["latency_ms"][sample] = {"median": round(statistics.median(times), 3),
                                           "min": round(min(times), 3), "max": round(max(times), 3)}
            print(f"[{name}] {sample}: median {statistics.median(times):.2f} ms over {runs} runs", flush=True)
        (out / "model.cuda.pt2").unlink(missing_ok=True)  # too big to bring back; rebuilt on demand
        rows["backends"][name] = entry
    (out / f"gpu_run.{'_'.join(backends)}.json").write_text(json.dumps(rows, indent=2) + "\n")


def collect(export_dir: Path, returned: list[Path], json_out: Path) -> None:
    """Parity of GPU outputs against the stored eager CPU reference, and of each GPU backend against eager-cuda."""
    from autoexport.verify import DEFAULT_TOLERANCES, compare_arrays

    result = ExportResult.load(export_dir)
    tol = DEFAULT_TOLERANCES["fp32"]
    merged: dict = {"config": result.metadata["config_name"], "tolerance": tol.describe(), "backends": {}}
    outputs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for folder in returned:
        for run_file in folder.glob("gpu_run.*.json"):
            data = json.loads(run_file.read_text())
            merged.update(device=data["device"], torch=data["torch"], runs=data["runs"], warmup=data["warmup"])
            merged["backends"].update(data["backends"])
        for npz in folder.glob("*.npz"):
            backend, sample = npz.stem.split(".", 1)
            outputs[(backend, sample)] = load_npz(npz)
    for (backend, sample), got in sorted(outputs.items()):
        if "error" in merged["backends"].get(backend, {}):
            continue
        checks = {"vs_eager_cpu_reference": result.reference_outputs(sample)}
        if backend != "eager-cuda" and ("eager-cuda", sample) in outputs:
            checks["vs_eager_cuda"] = outputs[("eager-cuda", sample)]
        for label, expected in checks.items():
            per_output = {name: compare_arrays(expected[name], got[name], tol) for name in expected}
            merged["backends"][backend].setdefault("parity", {}).setdefault(label, {})[sample] = {
                "passed": all(m["passed"] for m in per_output.values()),
                "max_abs": max(m["max_abs"] for m in per_output.values()),
                "min_cosine": min(m["cosine"] for m in per_output.values()),
                "outputs": len(per_output)}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"{merged['config']} on {merged.get('device')}:")
    for backend, entry in merged["backends"].items():
        for label, per_sample in entry.get("parity", {}).items():
            for sample, p in per_sample.items():
                print(f"  {backend:10s} {label:22s} {sample:9s} max_abs {p['max_abs']:.2e} cosine {p['min_cosine']:.7f} "
                      f"{'pass' if p['passed'] else 'FAIL'}  median {entry['latency_ms'][sample]['median']:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("export_dir", type=Path)
    b.add_argument("target", type=Path)
    b.add_argument("--with", dest="with_", nargs="+", choices=GPU_BACKENDS, default=list(GPU_BACKENDS))
    b.add_argument("--samples", nargs="+", default=["sample_0", "heldout_0"])
    r = sub.add_parser("run")
    r.add_argument("bundle_dir", type=Path)
    r.add_argument("--backends", nargs="+", choices=GPU_BACKENDS, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--runs", type=int, default=20)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--return-samples", nargs="+", default=["heldout_0"],
                   help="samples whose outputs are written to --out for the CPU-reference comparison")
    c = sub.add_parser("collect")
    c.add_argument("export_dir", type=Path)
    c.add_argument("returned", type=Path, nargs="+")
    c.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "bundle":
        bundle(args.export_dir, args.target, args.with_, args.samples)
    elif args.command == "run":
        run(args.bundle_dir, args.backends, args.out, args.runs, args.warmup, args.return_samples)
    else:
        collect(args.export_dir, args.returned, args.json)


if __name__ == "__main__":
    main()
