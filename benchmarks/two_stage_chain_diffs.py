"""Where a two-stage detector's chained check fails (PointRCNN, PartA2, PV-RCNN): its split plan's stages run eager (the
graphs' PT2 programs, equal to eager in stages.json) and chained (their ONNX graphs in ONNX Runtime), with the same
host steps between them, on each zoo sample. Prints how far each stage's chained outputs are from eager's (row sets
matched as the chained check matches them), the RoI graph's ONNX Runtime - PT2 difference on the chained run's own
inputs (the graph's own error, apart from what its inputs' differences do), and every eager detection that no
chained detection matches within the fp32 tolerance.
Then the same stages in float64 (eager, the model in double): which of eager fp32 and the chained run is nearer to
it, per output, as the one-graph check's float64 diagnosis does. A host step that cannot run in float64 (PartA2's
detections: mmdet3d's rotation_3d_in_axis mixes float32 in) ends the float64 chain there, and is said so.

Usage: python benchmarks/two_stage_chain_diffs.py OUTPUT_DIR [SAMPLE ...], the kept output of a two-stage export
(`autoexport zoo --config NAME --keep` leaves OUTPUT_DIR as <config>.failed when the chain fails).
About 12 minutes per PointRCNN output, 5 per PartA2 output and 8 per PV-RCNN output on 2 CPU cores."""
import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from mmdet3d.models.layers import box3d_nms
from mmdet3d.structures import LiDARInstance3DBoxes

from autoexport import analyze as A
from autoexport.configs import resolve_config
from autoexport.patches import eager_substitutions
from autoexport.split import StageContext, split_plan_for
from autoexport.verify import DEFAULT_TOLERANCES, compare_arrays, compare_row_set, match_rows


def _nms_rotated_in_float32(boxes, scores, thresh, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    # mmcv's CPU nms_rotated takes float32 boxes and scores of one dtype; the float64 chain selects on its boxes
    # rounded to float32. A no-op for the fp32 chains.
    return _nms_rotated(boxes.float(), scores.float(), thresh, *args, **kwargs)


_nms_rotated = box3d_nms.nms_rotated
box3d_nms.nms_rotated = _nms_rotated_in_float32
folder = Path(sys.argv[1])
tol = DEFAULT_TOLERANCES["fp32"]
config = json.loads((folder / "metadata.json").read_text())["config_name"]
with eager_substitutions("cpu"):
    model = A.build_model(A.load_config(resolve_config(config)), "cpu", 0)
    plan = split_plan_for(model)
    context = StageContext(1, ({"box_type_3d": LiDARInstance3DBoxes},))
    graphs = [s.name for s in plan.stages if not s.host]
    programs = {s: torch.export.load(str(folder / f"stages/{s}/model.pt2")).module() for s in graphs}
    # The export's weights (random init, BatchNorm statistics calibrated on its samples) from the stage graphs,
    # which hold the detector's parts as parts.<attribute>.
    weights = {k.removeprefix("parts."): v for prog in programs.values() for k, v in prog.state_dict().items()}
    unloaded = model.load_state_dict(weights, strict=False)
    assert not unloaded.unexpected_keys, unloaded
    model64 = copy.deepcopy(model).double()
    runners = {s: ort.InferenceSession(str(folder / f"stages/{s}/model.onnx")) for s in graphs}
    row_sets = {n: group for s in plan.stages for group in s.row_sets for n in group}

    def run_graph(stage: str, tensors: dict, chained: bool) -> dict:
        names = [o.name for o in runners[stage].get_outputs()]
        inputs = [i.name for i in runners[stage].get_inputs()]
        if chained:
            return dict(zip(names, runners[stage].run(None, {n: tensors[n] for n in inputs})))
        with torch.no_grad():
            return {n: v.numpy() for n, v in zip(names, programs[stage](*[torch.from_numpy(tensors[n]) for n in inputs]))}

    def run_host(step, tensors: dict, detector=model) -> dict:  # noqa: ANN001
        feed = {n: torch.from_numpy(np.ascontiguousarray(tensors[n])) for n in step.input_names(list(tensors))}
        with torch.no_grad():
            return {k: v.numpy() for k, v in step.forward(detector, feed, context).items()}

    def run_chain(sample: str, chained: bool) -> dict:
        t = dict(np.load(folder / f"inputs/{sample}.npz"))
        for stage in plan.stages:
            t.update(run_host(stage, t) if stage.host else run_graph(stage.name, t, chained))
        return t

    def run_float64(sample: str) -> tuple[dict, str]:
        """Every stage eager in float64 while it can run so; (outputs so far, the stage that could not run)."""
        t = {n: torch.from_numpy(v).double() if v.dtype == np.float32 else torch.from_numpy(v)
             for n, v in np.load(folder / f"inputs/{sample}.npz").items()}
        for stage in plan.stages:
            try:
                with torch.no_grad():
                    out = stage.forward(model64, {n: t[n] for n in stage.input_names(list(t))}, context)
            except RuntimeError as err:
                return {k: v.numpy() for k, v in t.items()}, f"{stage.name} ({str(err).splitlines()[0][:80]})"
            out = out.get("head_outputs", out)
            t.update({k: v.double() if v.is_floating_point() else v for k, v in out.items()})
        return {k: v.numpy() for k, v in t.items()}, ""

    def differences(reference: dict, run: dict, names: list[str]) -> str:
        """Each output's max abs difference (row sets matched first) and how many rows or elements miss tolerance."""
        parts, done = [], set()
        for n in names:
            if n in done or n not in reference or n not in run:
                continue
            group = [m for m in row_sets.get(n, (n,)) if m in reference and m in run]
            results = (compare_row_set({m: reference[m] for m in group}, {m: run[m] for m in group}, tol)
                       if n in row_sets else {n: compare_arrays(reference[n], run[n], tol)})
            for m, r in results.items():
                parts.append(f"{m} {r['max_abs']:.2e}" + ("" if r["passed"] else f" ({r.get('note') or 'outside'})"))
            done.update(results)
        return ", ".join(parts)

    for sample in sys.argv[2:] or ("sample_0", "sample_1", "heldout_0"):
        eager, chained = run_chain(sample, False), run_chain(sample, True)
        names = [n for n in chained if n not in np.load(folder / f"inputs/{sample}.npz").files]
        print(f"{sample}: chained vs eager: {differences(eager, chained, names)}")
        roi = graphs[-1]
        same_inputs = run_graph(roi, chained, chained=False)
        print(f"  {roi} graph on the chained inputs, ONNX Runtime - PT2 max abs: " + ", ".join(
            f"{n} {np.abs(chained[n] - same_inputs[n]).max():.2e}" for n in same_inputs))
        detections = ("bboxes_3d", "scores_3d", "labels_3d")
        eb, cb = eager["bboxes_3d"], chained["bboxes_3d"]
        print(f"  detections: eager {len(eb)}, chained {len(cb)}; largest RoI side {np.abs(eager['rois'][:, 4:7]).max():.3g}")
        if len(eb) and len(cb) and match_rows([eager[n] for n in detections], [chained[n] for n in detections], tol)[0] is None:
            nearest = np.abs(eb[:, None, :] - cb[None, :, :]).max(-1).argmin(1)
            unmatched = [(i, j) for i, j in enumerate(nearest)
                         if not all(compare_arrays(eager[n][i], chained[n][j], tol)["passed"] for n in detections)]
            print(f"    {len(unmatched)} eager rows within tolerance of no chained row; the first 8:")
            for i, j in unmatched[:8]:
                print(f"    eager row {i}: box {np.round(eb[i], 4)} score {eager['scores_3d'][i]:.6f} | nearest "
                          f"chained row {j}: {np.round(cb[j], 4)} score {chained['scores_3d'][j]:.6f} | abs diff "
                          f"{np.round(np.abs(eb[i] - cb[j]), 5)}")
        exact, stopped = run_float64(sample)
        for label, run in (("eager fp32", eager), ("chained", chained)):
            print(f"  vs float64: {label}: {differences(exact, run, names)}")
        if stopped:
            print(f"  (float64 stops at {stopped})")
