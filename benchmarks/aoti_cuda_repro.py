"""Minimal reproducer of AOTInductor CUDA packages on one machine: a 2-layer conv net exported, compiled with
torch._inductor.aoti_compile_and_package and loaded back, one way per child process, so a segfault in one way
reports its signal (and faulthandler's Python stack) without stopping the others.

    python benchmarks/aoti_cuda_repro.py OUT_DIR            # every way; a JSON summary in OUT_DIR/aoti_repro.json
    python benchmarks/aoti_cuda_repro.py OUT_DIR --way NAME # one way, in this process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (device, compile options, environment, loader). Ways with the default options load the package the
# first of them compiled (a segfault comes after compilation, so the file is there).
WAYS = {
    "cpu_package": ("cpu", {}, {}, "aoti_load_package"),
    "cuda_default": ("cuda", {}, {}, "aoti_load_package"),
    "cuda_loader_direct": ("cuda", {}, {}, "AOTIModelPackageLoader"),
    "cuda_init_before_load": ("cuda", {}, {"AOTI_REPRO_INIT_CUDA": "1"}, "aoti_load_package"),
    "cuda_eager_module_loading": ("cuda", {}, {"CUDA_MODULE_LOADING": "EAGER"}, "aoti_load_package"),
    "cuda_embed_cubin": ("cuda", {"aot_inductor.embed_kernel_binary": True}, {}, "aoti_load_package"),
}


def one_way(out: Path, name: str) -> None:
    import faulthandler

    faulthandler.enable(all_threads=True)
    import torch

    device, options, _, loader = WAYS[name]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    net = Net().to(device).eval()
    x = torch.randn(1, 4, 32, 32, device=device)
    program = torch.export.export(net, (x,))
    shared = out / "cuda_default.pt2"
    if device == "cuda" and not options and shared.is_file():
        path = str(shared)
        print(f"[{name}] reusing {path}", flush=True)
    else:
        package = shared if device == "cuda" and not options else out / f"{name}.pt2"
        start = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                        inductor_configs=options)
        print(f"[{name}] compiled in {time.perf_counter() - start:.1f} s: {path}", flush=True)
    if os.environ.get("AOTI_REPRO_INIT_CUDA"):
        torch.cuda.init()
        torch.empty(1, device="cuda")
    print(f"[{name}] loading with {loader}", flush=True)
    if loader == "aoti_load_package":
        model = torch._inductor.aoti_load_package(path)
    elif loader == "package.load_package":
        from torch._inductor.package import load_package

        model = load_package(path)
    else:
        model = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    print(f"[{name}] loaded; running", flush=True)
    with torch.no_grad():
        got = model(x) if loader != "AOTIModelPackageLoader" else model.run([x])
        got = got[0] if isinstance(got, (list, tuple)) else got
        print(f"[{name}] ran: max abs vs eager {float((got - net(x)).abs().max()):.2e}", flush=True)


def every_way(out: Path, only: list[str] | None) -> None:
    summary = {}
    for name in only or list(WAYS):
        env = WAYS[name][2]
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, str(out), "--way", name], capture_output=True,
                                  text=True, env={**os.environ, **env}, timeout=150)
            code, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            # TimeoutExpired keeps bytes whatever text= says.
            code, text = "timeout", b"".join(x or b"" for x in (err.stdout, err.stderr)).decode(errors="replace")
        summary[name] = {"returncode": code, "seconds": round(time.perf_counter() - start, 1), "tail": text[-2500:]}
        print(f"== {name}: rc {code}\n{text[-1500:]}", flush=True)
        (out / "aoti_repro.json").write_text(json.dumps(summary, indent=2) + "\n")  # kept if a later way hangs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--way", choices=sorted(WAYS))
    parser.add_argument("--only", nargs="+", choices=sorted(WAYS), help="these ways only, in this order")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    one_way(args.out, args.way) if args.way else every_way(args.out, args.only)
