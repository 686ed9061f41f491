"""GPU parity and latency of an export: eager CUDA PyTorch, AOTInductor (CUDA) and IREE (cuda), on the export's
stored inputs. Three steps, because the GPU machine has torch but no mmcv/mmdet3d and takes at most 64 MiB:

    # here: a slim copy of the export (metadata, the artifacts one run needs, the stored inputs)
    python benchmarks/bench_gpu.py bundle OUT_DIR gpu_bundle/kitti --with iree-cuda
    # on the GPU machine (device tool): outputs as .npz and latencies as JSON into $OUT
    python benchmarks/bench_gpu.py run gpu_bundle/kitti --backends iree-cuda --out $OUT --runs 20
    # here: parity of the returned outputs against the stored eager CPU reference, merged into benchmarks/results/
    python benchmarks/bench_gpu.py collect OUT_DIR RETURNED_DIR --json benchmarks/results/gpu_<config>.json

`network` times the network alone on device-resident inputs with CUDA events (median of --runs after warm-up),
for eager CUDA, Inductor (torch.compile max-autotune, CUDA graphs) and AOTInductor, in fp32, TF32 and the fp16
export, each checked against the stored CPU eager reference:

    python benchmarks/bench_gpu.py bundle OUT_DIR gpu_bundle/kitti --with eager-cuda --fp16-export FP16_OUT_DIR
    python benchmarks/bench_gpu.py network gpu_bundle/kitti --out $OUT --runs 100   # on the GPU machine

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


def bundle(export_dir: Path, target: Path, with_: list[str], samples: list[str],
           fp16_export: Path | None = None) -> None:
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
    if fp16_export:  # the --precision fp16 export of the same model and samples, for `network`
        shutil.copy(fp16_export / "model.pt2", target / "model.fp16.pt2")
    (target / "reference").mkdir()
    for sample in samples[:1]:  # the network benchmark's sample: its parity is checked on the GPU machine
        np.savez_compressed(target / "reference" / f"{sample}.npz",
                            **load_npz(export_dir / "reference" / f"{sample}.npz"))
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


NETWORK_VARIANTS = ("eager-fp32", "eager-tf32", "inductor-fp32", "inductor-tf32", "inductor-fp16", "aoti-fp32",
                    "aoti-tf32", "aoti-fp16", "aoti_embed-fp32", "aoti_embed-tf32", "aoti_embed-fp16")
# aoti_embed: the package embeds its kernels' binaries in the shared library (aot_inductor.embed_kernel_binary)
# instead of loading .cubin files at run time.
# TF32 rounds conv and matmul inputs to fp16's 10-bit mantissa, so it is held to the fp16 rule, and reported
# against the fp32 rule as well.
NETWORK_TOLERANCE = {"fp32": "fp32", "tf32": "fp16", "fp16": "fp16"}


def _network_callable(kind: str, pt2: Path, work: Path):  # noqa: ANN202
    import torch

    from autoexport.backends.inductor import load_module

    if kind == "eager":
        return load_module(pt2, "cuda")
    if kind == "inductor":
        return torch.compile(load_module(pt2, "cuda"), mode="max-autotune", dynamic=False, fullgraph=True)
    from autoexport.backends.aoti import compile_package

    options = {"aot_inductor.embed_kernel_binary": True} if kind == "aoti_embed" else None
    compile_package(torch.export.load(str(pt2)), work / "model.cuda.pt2", "cuda", options)
    return torch._inductor.aoti_load_package(str(work / "model.cuda.pt2"))


def _event_times(fn, args, runs: int, warmup: int) -> list[float]:  # noqa: ANN001
    import torch

    for _ in range(warmup):
        torch.compiler.cudagraph_mark_step_begin()
        fn(*args)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in pairs:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graph trees: each call a new step, outputs may be reused
        start.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def network(bundle_dir: Path, variants: list[str], out: Path, sample: str, runs: int, warmup: int) -> None:
    import torch

    from autoexport.verify import DEFAULT_TOLERANCES, compare_arrays

    result = ExportResult.load(bundle_dir)
    feed = result.inputs(sample)
    reference = load_npz(bundle_dir / "reference" / f"{sample}.npz")
    args = [torch.from_numpy(feed[n]).cuda() for n in result.manifest.input_names]
    rows = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "config": result.metadata["config_name"],
            "sample": sample, "voxels": int(args[0].shape[0]), "runs": runs, "warmup": warmup,
            "timing": "CUDA events around one call of the network on device-resident inputs, median",
            "variants": {}}
    out.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        kind, precision = variant.split("-")
        pt2 = bundle_dir / ("model.fp16.pt2" if precision == "fp16" else "model.pt2")
        if not pt2.is_file():
            rows["variants"][variant] = {"error": f"{pt2.name} is not in the bundle"}
            continue
        torch._dynamo.reset()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        print(f"[{variant}] building", flush=True)
        try:
            start = time.perf_counter()
            fn = _network_callable(kind, pt2, out)
            with torch.no_grad():
                fn(*args)
                first_s = time.perf_counter() - start
                times = _event_times(fn, args, runs, warmup)
                torch.compiler.cudagraph_mark_step_begin()
                got = [o.detach().cpu().numpy() for o in fn(*args)]  # a timed kind of call (a CUDA graph replay)
        except Exception as err:  # noqa: BLE001 - one variant failing must not lose the others' numbers
            rows["variants"][variant] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            print(f"[{variant}] failed: {rows['variants'][variant]['error']}", flush=True)
            (out / f"gpu_network.{sample}.{'_'.join(variants)}.json").write_text(json.dumps(rows, indent=2) + "\n")
            continue
        entry = {"build_and_first_call_s": round(first_s, 1), "median_ms": round(statistics.median(times), 4),
                 "min_ms": round(min(times), 4), "max_ms": round(max(times), 4), "parity_vs_cpu_eager_reference": {}}
        for rule in sorted({"fp32", NETWORK_TOLERANCE[precision]}):
            tol = DEFAULT_TOLERANCES[rule]
            metrics = [compare_arrays(reference[n], g, tol) for n, g in zip(result.manifest.output_names, got)]
            entry["parity_vs_cpu_eager_reference"][f"{rule} rule ({tol.describe()})"] = {
                "passed": all(m["passed"] for m in metrics), "max_abs": max(m["max_abs"] for m in metrics),
                "min_cosine": min(m["cosine"] for m in metrics)}
        rows["variants"][variant] = entry
        print(f"[{variant}] median {entry['median_ms']:.3f} ms; {entry['parity_vs_cpu_eager_reference']}", flush=True)
        (out / "model.cuda.pt2").unlink(missing_ok=True)
        # Written after every variant: a runtime that kills the process (AOTInductor's loader) keeps the others.
        (out / f"gpu_network.{sample}.{'_'.join(variants)}.json").write_text(json.dumps(rows, indent=2) + "\n")


def network_collect(returned: list[Path], json_out: Path, notes: str) -> None:
    """Merges the per-process gpu_network.*.json files of one sample; speed-ups against eager fp32 of the same run."""
    merged: dict = {}
    for folder in returned:
        for run_file in sorted(folder.glob("gpu_network.*.json")):
            data = json.loads(run_file.read_text())
            merged.setdefault("variants", {}).update(data.pop("variants"))
            merged.update(data)
    base = merged["variants"].get("eager-fp32", {}).get("median_ms")
    for entry in merged["variants"].values():
        if base and "median_ms" in entry:
            entry["speedup_vs_eager_fp32"] = round(base / entry["median_ms"], 2)
    merged["notes"] = notes
    json_out.write_text(json.dumps(merged, indent=2) + "\n")
    for name, entry in merged["variants"].items():
        if "error" in entry:
            print(f"{name:14s} {entry['error'][:120]}")
            continue
        verdicts = ", ".join(f"{k.split(' ')[0]} {'pass' if v['passed'] else 'FAIL'} {v['max_abs']:.1e}"
                             for k, v in entry["parity_vs_cpu_eager_reference"].items())
        print(f"{name:14s} {entry['median_ms']:8.3f} ms  x{entry.get('speedup_vs_eager_fp32', 0):5.2f}  {verdicts}")


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
    b.add_argument("--fp16-export", type=Path, help="the --precision fp16 export of the same model, for `network`")
    n = sub.add_parser("network")
    n.add_argument("bundle_dir", type=Path)
    n.add_argument("--variants", nargs="+", choices=NETWORK_VARIANTS, default=list(NETWORK_VARIANTS))
    n.add_argument("--out", type=Path, required=True)
    n.add_argument("--sample", default="sample_0")
    n.add_argument("--runs", type=int, default=100)
    n.add_argument("--warmup", type=int, default=20)
    r = sub.add_parser("run")
    r.add_argument("bundle_dir", type=Path)
    r.add_argument("--backends", nargs="+", choices=GPU_BACKENDS, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--runs", type=int, default=20)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--return-samples", nargs="+", default=["heldout_0"],
                   help="samples whose outputs are written to --out for the CPU-reference comparison")
    nc = sub.add_parser("network-collect")
    nc.add_argument("returned", type=Path, nargs="+")
    nc.add_argument("--json", type=Path, required=True)
    nc.add_argument("--notes", default="")
    c = sub.add_parser("collect")
    c.add_argument("export_dir", type=Path)
    c.add_argument("returned", type=Path, nargs="+")
    c.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "bundle":
        bundle(args.export_dir, args.target, args.with_, args.samples, args.fp16_export)
    elif args.command == "network-collect":
        network_collect(args.returned, args.json, args.notes)
    elif args.command == "network":
        network(args.bundle_dir, args.variants, args.out, args.sample, args.runs, args.warmup)
    elif args.command == "run":
        run(args.bundle_dir, args.backends, args.out, args.runs, args.warmup, args.return_samples)
    else:
        collect(args.export_dir, args.returned, args.json)


if __name__ == "__main__":
    main()
