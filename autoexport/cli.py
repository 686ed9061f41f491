"""Command line: `autoexport --config X [...]` exports; `autoexport verify OUT_DIR` re-checks an export;
`autoexport predict OUT_DIR --points FILE` runs a `--scope detections` export on a point cloud."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import EXIT_EXPORT_FAILED, EXIT_OK, EXIT_PARITY_FAILED, AutoExportError, first_line
from .events import emit, open_events

if TYPE_CHECKING:  # verify imports torch: the CLI imports it only when a command needs it
    from .verify import ParityPolicy

log = logging.getLogger("autoexport")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2 through the CLI's error path, like any bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        from .errors import UserInputError

        raise UserInputError(f"{message}; see {self.prog} --help")


def _export_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="autoexport",
        description="Export an MMDetection3D model to torch.export (model.pt2) and ONNX, with numeric parity "
                    "against eager PyTorch. `autoexport verify OUT_DIR` re-checks an existing export.",
        epilog="exit codes: 0 ok, 1 parity failed, 2 bad input, 3 export failed")
    p.add_argument("--config", required=True,
                   help="config file, or the name of a config shipped with mmdet3d (e.g. "
                        "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class)")
    p.add_argument("--checkpoint", help="weights (.pth); random weights when omitted")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully, which can run code stored in it: only for files you trust. "
                        "Without it, checkpoints load with torch.load(weights_only=True) and the globals mmengine and "
                        "mmdet3d checkpoints carry")
    p.add_argument("--output-dir", type=Path, help="where to write the export (default: exported_models/<config>)")
    p.add_argument("--format", choices=["pt2", "onnx", "both"], default="both",
                   help="which formats to write: model.pt2, model.onnx or both")
    p.add_argument("--scope", choices=["network", "detections"], default="network",
                   help="what the graph covers: network (preprocessed inputs in, raw head tensors out; voxelization "
                        "and box decoding stay on the host) or detections (the raw point cloud in, boxes, scores and "
                        "labels out: range filter, voxelization, network, decoding and NMS in one graph)")
    p.add_argument("--device", default="cpu", help="torch device for the model and eager/PT2 runs (default cpu)")
    p.add_argument("--sample", nargs="+", action="extend", type=Path, default=[], metavar="FILE",
                   help="your own sample files in the dataset's format (--sample a.bin b.bin, or the flag repeated); "
                        "synthesized when omitted")
    p.add_argument("--data-info", type=Path, metavar="INFO.pkl",
                   help="samples from the dataset's own info file (written by mmdet3d's tools/create_data.py): its "
                        "first three records, parsed by the config's dataset class, with their point clouds, images "
                        "and calibration; loaded without running code")
    p.add_argument("--data-root", type=Path, metavar="DIR",
                   help="the folder the info file's paths are relative to (default: the info file's folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and synthesized samples")
    p.add_argument("--backend", action="append", default=[], metavar="KIND[:TARGET]",
                   help="also compile for a backend and check its parity (repeatable): iree (= iree:llvm-cpu), "
                        "iree:cuda[:sm_XX], aoti (= aoti:cpu), aoti:cuda, inductor (= inductor:cpu), "
                        "inductor:cuda, tensorrt[:fp16|:int8]")
    p.add_argument("--capacity", default="dynamic", metavar="dynamic|auto|N",
                   help="IREE inputs: dynamic shapes (default), or static buffers padded to N rows plus a count input; "
                        "auto takes the model's own bound (e.g. the voxel layer's test max_voxels)")
    p.add_argument("--split", action="store_true",
                   help="also export the model as named stages (stages/<name>/model.pt2/.onnx and stages.json: "
                        "lidar.encoder, bev.backbone, head), each checked alone and chained")
    _precision_args(p)
    _tolerance_args(p)
    p.add_argument("--events", type=Path, metavar="FILE",
                   help="also write the export's progress as JSON lines (stages, patches, exit code, error) here")
    p.add_argument("--verbose", action="store_true", help="debug logs and full tracebacks")
    p.add_argument("--version", action="version", version=f"autoexport {__version__}")
    return p


def _precision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reduced precision", "INT8 post-training quantization (pytorch-quantization) or FP16, "
                                                  "with a fidelity report (quant_report.json/.md) against FP32")
    g.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="fp32",
                   help="the precision of the exported model")
    g.add_argument("--calib-samples", type=int, default=16, metavar="N",
                   help="int8: calibration samples through the real test pipeline (default 16)")
    g.add_argument("--calib-data", type=Path, metavar="DIR",
                   help="int8: folder of the dataset's point cloud files (.bin/.npy) to calibrate on (the first N, "
                        "sorted by name; the rest serve as held-out samples); synthesized scenes when omitted")
    g.add_argument("--calibrator", choices=["histogram", "max"], default="histogram",
                   help="int8: activation calibrator (default histogram)")
    g.add_argument("--amax-method", choices=["mse", "percentile", "entropy"], default="mse",
                   help="int8: how the histogram calibrator picks amax (default mse)")
    g.add_argument("--percentile", type=float, default=99.99, help="int8: for --amax-method percentile")
    g.add_argument("--skip-layers", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="int8: keep layers whose module path matches (fnmatch, e.g. 'bbox_head.conv_*') in float")
    g.add_argument("--sensitivity", action="store_true",
                   help="int8: profile each layer quantized alone and list those that hurt most (feeds --skip-layers)")
    g.add_argument("--eval-samples", type=int, default=20, metavar="N",
                   help="held-out samples for the fidelity report, never used for calibration (default 20)")
    g.add_argument("--agreement-score-thr", type=float, metavar="T",
                   help="score threshold for detection agreement (default: the model's test_cfg)")


def _tolerance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=float, help="absolute tolerance of fp32 parity checks (default 1e-4)")
    p.add_argument("--rtol", type=float, help="relative tolerance of fp32 parity checks (default 1e-4)")
    p.add_argument("--tolerance", action="append", default=[], metavar="PRECISION=ATOL,RTOL",
                   help="tolerance for one precision (fp32, fp16, int8), e.g. fp16=2e-2,1e-2 (repeatable)")
    p.add_argument("--parity", choices=["float64", "strict"],
                   help="float64 (default): an output outside the tolerance still passes when its RMSE against the "
                        "model run in float64 is at most M x eager fp32's + atol/10; strict: the tolerance alone")
    p.add_argument("--fp64-multiplier", action="append", default=[], metavar="PRECISION=M",
                   help="the float64 rule's M for one precision (defaults fp32=2, tf32=2, fp16=3; repeatable)")
    p.add_argument("--compare", action="append", default=[], metavar="OUTPUT=RULE",
                   help="the compare function of one output: elementwise or float64 (repeatable)")


def _policy(args: argparse.Namespace, base: "ParityPolicy") -> "ParityPolicy":
    """The stored or default parity policy with the user's --parity, --fp64-multiplier and --compare applied."""
    from .errors import UserInputError
    from .verify import COMPARE_RULES, ParityPolicy

    multipliers, per_output = dict(base.multipliers), dict(base.per_output)
    for text in args.fp64_multiplier:
        precision, _, value = text.partition("=")
        try:
            multiplier = float(value)
        except ValueError:
            multiplier = float("nan")
        if precision not in multipliers or not multiplier > 0:
            raise UserInputError(f"--fp64-multiplier {text!r}: expected PRECISION=M with PRECISION one of "
                                 f"{', '.join(multipliers)} and M > 0, e.g. fp32=2")
        multipliers[precision] = multiplier
    for text in args.compare:
        output, _, rule = text.partition("=")
        if not output or rule not in COMPARE_RULES:
            raise UserInputError(f"--compare {text!r}: expected OUTPUT=RULE with RULE one of {', '.join(COMPARE_RULES)}")
        per_output[output] = rule
    return ParityPolicy(args.parity or base.mode, multipliers, per_output)


def _tolerances(args: argparse.Namespace, base: dict) -> dict:
    """The stored or default tolerances with the user's overrides applied."""
    from .errors import UserInputError
    from .verify import Tolerance

    merged = dict(base)
    for text in args.tolerance:
        try:
            precision, values = text.split("=", 1)
            atol, rtol = (float(v) for v in values.split(","))
        except ValueError:
            raise UserInputError(f"--tolerance {text!r}: expected PRECISION=ATOL,RTOL, e.g. fp16=2e-2,1e-2") from None
        if precision not in merged:
            raise UserInputError(f"--tolerance {text!r}: unknown precision; choose from {', '.join(merged)}")
        merged[precision] = Tolerance(atol, rtol, precision, merged[precision].min_cosine)
    for name, value in (("--atol", args.atol), ("--rtol", args.rtol)):
        if value is not None and not value >= 0:
            raise UserInputError(f"{name} {value}: a tolerance must be a number >= 0")
    if any(not (t.atol >= 0 and t.rtol >= 0) for t in merged.values()):
        raise UserInputError("--tolerance: ATOL and RTOL must be numbers >= 0")
    fp32 = merged["fp32"]
    merged["fp32"] = Tolerance(args.atol if args.atol is not None else fp32.atol,
                               args.rtol if args.rtol is not None else fp32.rtol, "fp32", fp32.min_cosine)
    return merged


def _verify_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autoexport verify",
                                description="Re-run every parity check of an export from its stored inputs.")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--backend", action="append", default=None, metavar="NAME",
                   help="check only these (repeatable): pt2, onnxruntime, or a lowered backend such as iree, "
                        "iree:cuda, aoti; default: every artifact in the directory")
    p.add_argument("--scope", choices=["network", "detections"], default="network",
                   help="what the graph covers: network (preprocessed inputs in, raw head tensors out; voxelization "
                        "and box decoding stay on the host) or detections (the raw point cloud in, boxes, scores and "
                        "labels out: range filter, voxelization, network, decoding and NMS in one graph)")
    p.add_argument("--device", default="cpu", help="torch device for the PT2 runner (default cpu)")
    p.add_argument("--report-dir", type=Path,
                   help="write parity.json/.md/.xml here (default: print only, the stored reports stay as exported)")
    _tolerance_args(p)
    p.add_argument("--verbose", action="store_true", help="debug logs")
    return p


def _predict_parser() -> argparse.ArgumentParser:
    from .deploy import BACKEND_NAMES

    p = _Parser(prog="autoexport predict",
                description="Run a --scope detections export on one point cloud file and print its boxes; needs "
                            "only the backend's runtime, not mmdet3d.",
                epilog="exit codes: 0 ok, 2 bad input, 3 the runtime failed")
    p.add_argument("output_dir", type=Path, help="the --output-dir of `autoexport --scope detections`")
    p.add_argument("--points", type=Path, required=True, metavar="FILE",
                   help="point cloud file in the dataset's format (.bin: float32 rows of the config's load_dim "
                        "values, of which use_dim are kept, as LoadPointsFromFile reads it; or .npy)")
    p.add_argument("--backend", default="pt2", metavar="NAME",
                   help=f"which artifact runs: {', '.join(BACKEND_NAMES)} (iree and aoti when the export has them; "
                        "a target as in iree:cuda)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the detections as JSON here")
    p.add_argument("--bev", type=Path, metavar="OUT.png",
                   help="also draw a bird's-eye view: the points, each box coloured by class with its heading and "
                        "score (needs matplotlib)")
    p.add_argument("--reference-json", type=Path, metavar="REF.json",
                   help="with --bev: overlay these boxes (an earlier --json output) dashed in black, to compare")
    p.add_argument("--verbose", action="store_true", help="debug logs and full tracebacks")
    return p


def _run_predict(argv: list[str]) -> int:
    import json

    from .errors import UserInputError

    args = _predict_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .deploy import Detections, load, render_bev

    reference = None
    if args.reference_json is not None:
        if args.bev is None:
            raise UserInputError("--reference-json is drawn into the --bev picture; add --bev OUT.png")
        try:
            reference = Detections.from_json(json.loads(args.reference_json.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserInputError(f"--reference-json {args.reference_json}: not a detections file of `autoexport "
                                 f"predict --json` ({first_line(str(err))[:160]})") from None
    model = load(args.output_dir)
    points = model.prepare(args.points)
    detections = model.predict(points, backend=args.backend)
    for name, score, box in zip(detections.names, detections.scores, detections.boxes):
        x, y, z, dx, dy, dz, yaw = (float(v) for v in box)
        print(f"{name:<12} {score:6.3f}  xyz {x:8.2f} {y:8.2f} {z:7.2f}  size {dx:6.2f} {dy:6.2f} {dz:6.2f}  "
              f"yaw {yaw:6.2f}")
    print(f"{len(detections)} detections ({args.backend}, {len(points)} points)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"points": str(args.points), "backend": args.backend, "num_points": len(points),
                **detections.to_json()}
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    if args.bev is not None:
        render_bev(args.bev, points, detections, reference, model.point_cloud_range,
                   title=f"{args.points.name}: {len(detections)} detections ({args.backend})"
                         + (f", reference dashed ({len(reference)})" if reference is not None else ""))
    return EXIT_OK


def _setup_logging(verbose: bool) -> None:
    # Libraries (onnxscript's optimizer, torch.export) log at INFO too; only autoexport's own lines are progress.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # mmengine and torch warnings (CPU usage, deprecations) say nothing about the export.
        warnings.filterwarnings("ignore")
        logging.getLogger("mmengine").setLevel(logging.ERROR)


def _run_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    _setup_logging(args.verbose)
    open_events(args.events)
    from .pipeline import ExportOptions, run_export
    from .quantize import QuantRecipe
    from .verify import DEFAULT_TOLERANCES, ParityPolicy

    config_name = Path(args.config).stem if args.config.endswith(".py") else Path(args.config).name
    options = ExportOptions(
        config=args.config,
        output_dir=args.output_dir or Path("exported_models") / config_name,
        checkpoint=args.checkpoint,
        trust_checkpoint=args.trust_checkpoint,
        formats=("pt2", "onnx") if args.format == "both" else (args.format,),
        device=args.device,
        scope=args.scope,
        samples=args.sample,
        data_info=args.data_info,
        data_root=args.data_root,
        overwrite=args.overwrite,
        seed=args.seed,
        tolerances=_tolerances(args, DEFAULT_TOLERANCES),
        parity=_policy(args, ParityPolicy()),
        backends=tuple(args.backend),
        capacity=args.capacity,
        precision=args.precision,
        quant=QuantRecipe(calibrator=args.calibrator, amax_method=args.amax_method, percentile=args.percentile,
                          calib_samples=args.calib_samples, skip_layers=tuple(args.skip_layers)),
        calib_data=args.calib_data,
        eval_samples=args.eval_samples,
        agreement_score_thr=args.agreement_score_thr,
        sensitivity=args.sensitivity,
        split=args.split,
        verbose=args.verbose,
    )
    result = run_export(options)
    emit("exit", code=EXIT_OK)
    log.info("exported %s to %s: %s", result.metadata["model_type"], result.output_dir,
             ", ".join(sorted(p.name for p in result.output_dir.iterdir())))
    return EXIT_OK


def _run_verify(argv: list[str]) -> int:
    args = _verify_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .result import ExportResult, write_reports

    result = ExportResult.load(args.output_dir)
    report = result.verify(_tolerances(args, result.stored_tolerances()), args.backend, args.device,
                           _policy(args, result.stored_policy()))
    log.info("%s", report.table())
    if args.report_dir:
        write_reports(report, args.report_dir, f"Parity of {result.metadata['config_name']} (verify)")
        log.info("reports written to %s", args.report_dir)
    log.info("verify: %s", "all checks passed" if report.passed else f"{len(report.failures())} checks FAILED")
    return EXIT_OK if report.passed else EXIT_PARITY_FAILED


def _run_zoo(argv: list[str]) -> int:
    from .zoo import run_merge, run_zoo, zoo_parser

    if argv and argv[0] == "merge":
        _setup_logging("--verbose" in argv)
        return run_merge(argv[1:])
    args = zoo_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return run_zoo(args)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that the staging directory is cleaned up as for Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _in_main_thread() else None
    try:
        if argv and argv[0] == "verify":
            return _run_verify(argv[1:])
        if argv and argv[0] == "zoo":
            return _run_zoo(argv[1:])
        if argv and argv[0] == "predict":
            return _run_predict(argv[1:])
        if argv and argv[0] == "export":
            argv = argv[1:]
        return _run_export(argv)
    except AutoExportError as err:
        log.error("autoexport: error: %s", err)
        emit("exit", code=err.exit_code, error=str(err), kind=type(err).__name__)
        if verbose and err.__cause__ is not None:
            log.error("%s", "".join(traceback.format_exception(err.__cause__)))
        return err.exit_code
    except (KeyboardInterrupt, Terminated) as err:
        log.error("autoexport: %s; the output directory was not written (its staging directory was removed)",
                  "terminated" if isinstance(err, Terminated) else "interrupted")
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:  # noqa: BLE001 - never a bare traceback: one line, the trace behind --verbose
        log.error("autoexport: error: unexpected %s outside the export stages: %s; this is a bug of autoexport: "
                  "rerun with --verbose for the trace and report it", type(err).__name__, first_line(str(err))[:300])
        emit("exit", code=EXIT_EXPORT_FAILED, error=f"unexpected {type(err).__name__}: {first_line(str(err))[:300]}",
             kind=type(err).__name__)
        if verbose:
            log.error("%s", "".join(traceback.format_exception(err)))
        return EXIT_EXPORT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
