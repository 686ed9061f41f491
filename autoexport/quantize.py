"""Stage 2b, quantize: INT8 post-training quantization with pytorch-quantization (the seed recipe).

On a copy of the FP32 model: fold BatchNorm into the preceding conv/linear, swap conv/deconv/linear modules for
pytorch-quantization's quantized ones (per-channel weights, per-tensor inputs), give layers that read the same
tensor, and the inputs of a concat they read, one shared input quantizer, calibrate the input quantizers on
samples from the real data pipeline (histogram + MSE/percentile/entropy amax, or max), and keep listed layers in
float. The export bridge that turns the calibrated quantizers into quantize/dequantize ops is an export patch
(`TensorQuantizer.forward` in patches.py), so it applies only inside torch.export.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from .errors import UserInputError
from .knowledge import KNOWLEDGE
from .registry import ClassRegistry
from .verify import cosine

log = logging.getLogger("autoexport")

INT8_BOUND = 127  # symmetric int8: scale = amax / 127, zero point 0, range [-128, 127] as in ONNX

CALIBRATORS = ("histogram", "max")
AMAX_METHODS = ("mse", "percentile", "entropy")


@dataclass(frozen=True)
class QuantRecipe:
    calibrator: str = "histogram"  # histogram or max, for the input (activation) quantizers
    amax_method: str = "mse"  # how a histogram becomes amax: mse, percentile or entropy
    percentile: float = 99.99
    calib_samples: int = 16
    skip_layers: tuple[str, ...] = ()  # fnmatch patterns over module paths, kept in float
    fold_batchnorm: bool = True
    share_quantizers: bool = True

    def validate(self) -> None:
        if self.calibrator not in CALIBRATORS:
            raise UserInputError(f"--calibrator {self.calibrator!r}: choose from {', '.join(CALIBRATORS)}")
        if self.amax_method not in AMAX_METHODS:
            raise UserInputError(f"--amax-method {self.amax_method!r}: choose from {', '.join(AMAX_METHODS)}")
        if self.calib_samples < 1:
            raise UserInputError("--calib-samples must be at least 1")


@dataclass
class QuantizedLayer:
    path: str
    kind: str  # the float class it replaced
    input_amax: float | None = None
    weight_amax: tuple[float, float] | None = None  # (min, max) over channels
    weight_axis: int | None = None
    shared_input_with: list[str] = field(default_factory=list)


@dataclass
class QuantizationResult:
    model: torch.nn.Module
    recipe: QuantRecipe
    layers: list[QuantizedLayer]
    float_layers: dict[str, str]  # path -> why it stays in float
    folded_batchnorms: list[str]
    shared_groups: list[dict]  # {"layers": [...], "concat_inputs": [...], "amax": float}
    calibration: dict

    def to_json(self) -> dict:
        return {"recipe": asdict(self.recipe), "quantized_layers": [asdict(layer) for layer in self.layers],
                "float_layers": self.float_layers, "folded_batchnorms": self.folded_batchnorms,
                "shared_input_quantizers": self.shared_groups, "calibration": self.calibration}


# ---- BatchNorm folding ---------------------------------------------------------------------------

_FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
             torch.nn.ConvTranspose3d, torch.nn.Linear)


def _fold_into(layer: torch.nn.Module, norm: torch.nn.modules.batchnorm._BatchNorm) -> bool:
    """layer(x) followed by norm, in eval mode, becomes one layer with scaled weights and a bias."""
    if not isinstance(layer, _FOLDABLE) or norm.running_mean is None or not norm.track_running_stats:
        return False
    transposed = isinstance(layer, torch.nn.modules.conv._ConvTransposeNd)
    if transposed and layer.groups != 1:
        return False
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps) if norm.affine else \
            1.0 / torch.sqrt(norm.running_var + norm.eps)
        shift = (norm.bias if norm.affine else 0.0) - norm.running_mean * scale
        out_axis = 1 if transposed else 0  # transposed conv weights are (in, out, k...)
        shape = [1] * layer.weight.dim()
        shape[out_axis] = -1
        layer.weight.mul_(scale.view(shape))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
        layer.bias = torch.nn.Parameter(bias * scale + shift, requires_grad=False)
    return True


# Where a class keeps a layer followed by its norm: ClassKnowledge.batchnorm_pair (ConvModule, PFNLayer, ...).
# nn.Sequential (conv, bn, relu blocks of SECOND/SECONDFPN) is handled generically below.


def fold_batchnorms(model: torch.nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a conv/linear into it; the norm becomes Identity."""
    folded = []
    for path, module in list(model.named_modules()):
        pairs: list[tuple[str, str]] = []
        if isinstance(module, torch.nn.Sequential):
            names = list(module._modules)
            pairs = [(a, b) for a, b in zip(names, names[1:])
                     if isinstance(module._modules[b], torch.nn.modules.batchnorm._BatchNorm)]
        elif (pairing := KNOWLEDGE.value(module, "batchnorm_pair")) is not None and (pair := pairing(module)) is not None:
            pairs = [pair]
        for layer_name, norm_name in pairs:
            layer, norm = getattr(module, layer_name), getattr(module, norm_name)
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and _fold_into(layer, norm):
                setattr(module, norm_name, torch.nn.Identity())
                folded.append(f"{path}.{norm_name}" if path else norm_name)
    return folded


# ---- quantized modules ---------------------------------------------------------------------------

def _descriptors(recipe: QuantRecipe, weight_axis: int) -> tuple[Any, Any]:
    from pytorch_quantization.tensor_quant import QuantDescriptor

    return (QuantDescriptor(num_bits=8, calib_method=recipe.calibrator),
            QuantDescriptor(num_bits=8, axis=(weight_axis,), calib_method="max"))


def _conv_factory(quant_class_name: str, transposed: bool) -> Callable[[torch.nn.Module, QuantRecipe], torch.nn.Module]:
    def make(layer: torch.nn.Module, recipe: QuantRecipe) -> torch.nn.Module:
        from pytorch_quantization import nn as quant_nn

        # Per output channel: axis 1 for transposed convs, whose weight is (in, out, k...). pytorch-quantization's
        # default (axis 0) would scale per input channel, which integer kernels cannot undo after accumulation.
        desc_input, desc_weight = _descriptors(recipe, 1 if transposed else 0)
        kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                      bias=layer.bias is not None, padding_mode=layer.padding_mode,
                      quant_desc_input=desc_input, quant_desc_weight=desc_weight)
        if transposed:
            kwargs["output_padding"] = layer.output_padding
        quant = getattr(quant_nn, quant_class_name)(layer.in_channels, layer.out_channels, layer.kernel_size, **kwargs)
        return _copy_parameters(layer, quant)

    return make


def _linear_factory(layer: torch.nn.Module, recipe: QuantRecipe) -> torch.nn.Module:
    from pytorch_quantization import nn as quant_nn

    desc_input, desc_weight = _descriptors(recipe, 0)
    quant = quant_nn.QuantLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                 quant_desc_input=desc_input, quant_desc_weight=desc_weight)
    return _copy_parameters(layer, quant)


def _copy_parameters(layer: torch.nn.Module, quant: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        quant.weight.copy_(layer.weight)
        if layer.bias is not None:
            quant.bias.copy_(layer.bias)
    quant.requires_grad_(False)
    return quant.to(layer.weight.device)


# Float layer class -> its quantized replacement. Subclasses (mmcv's registered Conv2d/ConvTranspose2d) resolve
# through the MRO.
QUANT_MODULES: ClassRegistry[Callable[[torch.nn.Module, QuantRecipe], torch.nn.Module]] = ClassRegistry("quantized module")
QUANT_MODULES.register("Conv1d", _conv_factory("QuantConv1d", False))
QUANT_MODULES.register("Conv2d", _conv_factory("QuantConv2d", False))
QUANT_MODULES.register("Conv3d", _conv_factory("QuantConv3d", False))
QUANT_MODULES.register("ConvTranspose1d", _conv_factory("QuantConvTranspose1d", True))
QUANT_MODULES.register("ConvTranspose2d", _conv_factory("QuantConvTranspose2d", True))
QUANT_MODULES.register("ConvTranspose3d", _conv_factory("QuantConvTranspose3d", True))
QUANT_MODULES.register("Linear", _linear_factory)

# Layers kept in float unless the user lists them nowhere else: ClassKnowledge.keep_float_in_int8 of their owner.


def quantizable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> float layer that QUANT_MODULES can replace, in module order."""
    from pytorch_quantization.nn.modules._utils import QuantMixin

    return {path: m for path, m in model.named_modules()
            if path and not isinstance(m, QuantMixin) and QUANT_MODULES.lookup(m) is not None}


def default_float_layers(model: torch.nn.Module, candidates: Iterable[str]) -> dict[str, str]:
    """Layers under an owner whose class keeps them float (ClassKnowledge.keep_float_in_int8): path -> reason."""
    owners = {path: KNOWLEDGE.lookup(m, "keep_float_in_int8") for path, m in model.named_modules() if path}
    reasons = {}
    for layer_path in candidates:
        for owner_path, found in owners.items():
            if found and (layer_path == owner_path or layer_path.startswith(owner_path + ".")):
                reasons[layer_path] = f"{found[0]}: {found[1]}"
    return reasons


def match_skip_patterns(patterns: Sequence[str], layer_paths: Sequence[str]) -> dict[str, str]:
    """Layers matching the user's --skip-layers patterns; a pattern matching nothing is an error."""
    matched: dict[str, str] = {}
    for pattern in patterns:
        hits = [p for p in layer_paths if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            examples = ", ".join(list(layer_paths)[:6])
            raise UserInputError(f"--skip-layers {pattern!r} matches none of the {len(layer_paths)} quantizable layers "
                                 f"(fnmatch over module paths, e.g. {examples}, ...); `--sensitivity` lists them all")
        matched.update({p: f"--skip-layers {pattern}" for p in hits})
    return matched


def _set_submodule(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def insert_quantizers(model: torch.nn.Module, recipe: QuantRecipe, keep_float: dict[str, str]) -> list[str]:
    """Replace every quantizable layer not kept in float; returns the quantized paths."""
    replaced = []
    for path, layer in quantizable_layers(model).items():
        if path in keep_float:
            continue
        _set_submodule(model, path, QUANT_MODULES.lookup(layer)[1](layer, recipe))
        replaced.append(path)
    return replaced


def quant_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from pytorch_quantization.nn.modules._utils import QuantMixin

    return {path: m for path, m in model.named_modules() if isinstance(m, QuantMixin)}


def tensor_quantizers(model: torch.nn.Module) -> list[Any]:
    from pytorch_quantization.nn import TensorQuantizer

    seen: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            seen.setdefault(id(module), module)
    return list(seen.values())


# ---- shared input quantizers ---------------------------------------------------------------------

class _FlowRecorder(TorchFunctionMode):
    """Records torch.cat calls (inputs -> output) during one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.concats: list[tuple[list[torch.Tensor], torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        result = func(*args, **(kwargs or {}))
        if func in (torch.cat, torch.concat, torch.concatenate):
            tensors = args[0] if args else (kwargs or {}).get("tensors")
            self.concats.append((list(tensors), result))
        return result


@dataclass
class _ModuleCall:
    path: str
    module: torch.nn.Module
    input: torch.Tensor | None
    output: torch.Tensor


# Activations f with f(dq(q(x))) == dq(q(f(x))) for symmetric int8: a quantizer may move across them. ReLU only:
# negative values quantize to <= 0 and come out 0 either way; positive values are untouched by ReLU.
QUANT_TRANSPARENT: tuple[type, ...] = (torch.nn.ReLU, torch.nn.Identity)


def _record_flow(model: torch.nn.Module, run_once: Callable[[], Any]) -> tuple[list[_ModuleCall], _FlowRecorder]:
    calls: list[_ModuleCall] = []
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(m, args, out, path=path):  # noqa: ANN001, ANN202
            if isinstance(out, torch.Tensor):
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                calls.append(_ModuleCall(path, m, first, out))
        handles.append(module.register_forward_hook(hook))
    recorder = _FlowRecorder()
    try:
        with torch.no_grad(), recorder:
            run_once()
    finally:
        for handle in handles:
            handle.remove()
    return calls, recorder


def _output_quantizer_site(tensor: torch.Tensor, calls: list[_ModuleCall], layers: dict[str, torch.nn.Module],
                           depth: dict[str, int]) -> str | None:
    """Where to quantize `tensor` at its source: the quantized layer that produced it, through ReLU/Identity
    (so ONNX Runtime sees DQ -> Conv -> Q and runs an integer conv), else the outermost module that returned it."""
    current = tensor
    while True:
        producer = next((c for c in calls if c.output is current and c.path in layers), None)
        if producer is not None:
            return producer.path
        step = next((c for c in calls if c.output is current and isinstance(c.module, QUANT_TRANSPARENT)
                     and c.input is not None and c.input is not current), None)
        if step is None:
            break
        current = step.input
    owners = sorted((c.path for c in calls if c.output is tensor), key=lambda p: depth[p])
    return owners[0] if owners else None


def share_input_quantizers(model: torch.nn.Module, run_once: Callable[[], Any]) -> list[dict]:
    """One input quantizer per tensor that quantized layers read (one scale, no re-quantization between them),
    also applied where the tensor is made: at the output of the layer that produced it (before its ReLU, which
    is exact), or at each input of a concat that produced it, so the concat runs on int8 values of one scale."""
    layers = quant_layers(model)
    calls, recorder = _record_flow(model, run_once)
    depth = {path: path.count(".") for path, _ in model.named_modules()}
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for call in calls:
        if call.path in layers and call.input is not None:
            groups.setdefault(id(call.input), []).append(call.path)
            tensors[id(call.input)] = call.input  # kept alive, so ids stay unique
    shared = []
    for key, paths in groups.items():
        paths = list(dict.fromkeys(paths))
        quantizer = layers[paths[0]]._input_quantizer
        for path in paths[1:]:
            layers[path]._input_quantizer = quantizer
        concat = next((inputs for inputs, out in recorder.concats if out is tensors[key]), None)
        sources = concat if concat is not None else [tensors[key]]
        sites = [_output_quantizer_site(t, calls, layers, depth) for t in sources]
        if concat is None and sites[0] is not None and sites[0] not in layers:
            sites = [None]  # a plain module output (not a quantized layer): the consumer's quantizer suffices
        for site in sites:
            if site is not None:
                model.get_submodule(site).register_forward_hook(lambda m, args, out, q=quantizer: q(out))
        shared.append({"layers": paths, "concat": concat is not None, "quantized_at": sites})
    return shared


# ---- calibration ---------------------------------------------------------------------------------

def mse_amax(calibrator: Any, start_bin: int = 128) -> torch.Tensor:
    """pytorch-quantization's MSE amax search (HistogramCalibrator.compute_amax("mse")) on the CPU: 2.1.3 moves
    the histogram to CUDA unconditionally. Same candidates (bin centres from start_bin on), the toolkit's own
    fake quantization, the same count-weighted squared error."""
    from pytorch_quantization.tensor_quant import fake_tensor_quant

    counts = torch.as_tensor(calibrator._calib_hist).float().cpu()
    edges = torch.as_tensor(calibrator._calib_bin_edges).float().cpu()
    centers = (edges[1:] + edges[:-1]) / 2
    errors = [float(((fake_tensor_quant(centers, centers[i], calibrator._num_bits, calibrator._unsigned) - centers) ** 2
                     * counts).mean()) for i in range(start_bin, len(centers))]
    return centers[start_bin + int(np.argmin(errors))].clone()


def calibrate(model: torch.nn.Module, recipe: QuantRecipe, run_samples: Callable[[], int]) -> dict:
    """Collect statistics over the calibration samples, then set every quantizer's amax."""
    quantizers = tensor_quantizers(model)
    for q in quantizers:
        q.disable_quant()
        q.enable_calib()
    start = time.perf_counter()
    try:
        count = run_samples()
    finally:
        for q in quantizers:
            q.disable_calib()
            q.enable_quant()
    collect_s = time.perf_counter() - start
    start = time.perf_counter()
    # pytorch-quantization logs a warning per quantizer here; the returned summary says the same once.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        for q in quantizers:
            if q._calibrator is None:
                continue
            if type(q._calibrator).__name__ == "HistogramCalibrator" and recipe.amax_method == "mse":
                q.amax = mse_amax(q._calibrator)
            elif type(q._calibrator).__name__ == "HistogramCalibrator":
                kwargs = {"percentile": recipe.percentile} if recipe.amax_method == "percentile" else {}
                q.load_calib_amax(recipe.amax_method, **kwargs)
            else:
                q.load_calib_amax()
            # An all-zero channel or input gives amax 0 (scale 0); any positive scale represents zeros exactly.
            q._amax.clamp_(min=1e-8)
    finally:
        logger.setLevel(level)
    return {"samples": count, "collect_s": round(collect_s, 3), "amax_s": round(time.perf_counter() - start, 3),
            "calibrator": recipe.calibrator,
            "amax_method": recipe.amax_method if recipe.calibrator == "histogram" else "max"}


def describe_layers(model: torch.nn.Module, kinds: dict[str, str], shared: list[dict]) -> list[QuantizedLayer]:
    shared_with = {p: [o for o in g["layers"] if o != p] for g in shared for p in g["layers"]}
    described = []
    for path, layer in quant_layers(model).items():
        w_amax = layer._weight_quantizer.amax.flatten()
        axis = layer._weight_quantizer.axis
        described.append(QuantizedLayer(
            path=path, kind=kinds.get(path, type(layer).__name__),
            input_amax=float(layer._input_quantizer.amax) if layer._input_quantizer.amax is not None else None,
            weight_amax=(float(w_amax.min()), float(w_amax.max())),
            weight_axis=(axis[0] if isinstance(axis, (tuple, list)) else axis),
            shared_input_with=shared_with.get(path, [])))
    return described


def quantize_model(model: torch.nn.Module, recipe: QuantRecipe, make_runner: Callable[[torch.nn.Module], Callable[[Sequence[Any]], Any]],
                   calib_feeds: Sequence[Any]) -> QuantizationResult:
    """The whole recipe on a deep copy of `model`. make_runner(model) returns a function running one feed."""
    recipe.validate()
    candidates = list(quantizable_layers(model))
    if not candidates:
        raise UserInputError(f"{type(model).__name__} has no quantizable layers (conv, transposed conv or linear "
                             "modules); there is nothing to run in int8")
    keep_float = default_float_layers(model, candidates)
    keep_float.update(match_skip_patterns(recipe.skip_layers, candidates))
    if len(keep_float) == len(candidates):
        raise UserInputError(f"every one of the {len(candidates)} quantizable layers is kept in float "
                             "(--skip-layers); nothing would run in int8")
    quantized = copy.deepcopy(model)
    folded = fold_batchnorms(quantized) if recipe.fold_batchnorm else []
    kinds = {p: type(m).__name__ for p, m in quantizable_layers(quantized).items()}
    insert_quantizers(quantized, recipe, keep_float)
    run = make_runner(quantized)
    shared: list[dict] = []
    if recipe.share_quantizers:
        quantizers = tensor_quantizers(quantized)
        for q in quantizers:
            q.disable()
        try:
            shared = share_input_quantizers(quantized, lambda: run(calib_feeds[0]))
        finally:
            for q in quantizers:
                q.enable()

    def run_all() -> int:
        for index, feed in enumerate(calib_feeds):
            run(feed)
            if (index + 1) % 4 == 0 or index + 1 == len(calib_feeds):
                log.info("  calibration %d/%d samples", index + 1, len(calib_feeds))
        return len(calib_feeds)

    calibration = calibrate(quantized, recipe, run_all)
    for group in shared:
        group["amax"] = float(quant_layers(quantized)[group["layers"][0]]._input_quantizer.amax)
    return QuantizationResult(model=quantized, recipe=recipe, layers=describe_layers(quantized, kinds, shared),
                              float_layers=keep_float, folded_batchnorms=folded, shared_groups=shared,
                              calibration=calibration)


def freeze_for_export(model: torch.nn.Module) -> int:
    """Store each enabled quantizer's scale as Python floats, so the export bridge needs no amax.item() in the
    trace. Returns the number of quantizers frozen."""
    count = 0
    for q in tensor_quantizers(model):
        if q._disabled:
            continue
        if q.amax is None:
            raise RuntimeError("a quantizer has no amax: calibrate before export")
        amax = q.amax.detach().float().cpu()
        if amax.numel() == 1:
            q._export_scale = float(amax) / INT8_BOUND
            q._export_axis = None
        else:
            axis = q.axis[0] if isinstance(q.axis, (tuple, list)) else q.axis
            q._export_scale = (amax.flatten() / INT8_BOUND).tolist()
            q._export_axis = int(axis)
        count += 1
    return count


@contextmanager
def frozen_quantizers() -> Iterator[None]:
    """Run TensorQuantizer through the export bridge (frozen scales, quantized_decomposed ops) in eager PyTorch
    too, so the INT8 reference computes exactly what model.pt2 holds. pytorch-quantization's own fake quantization
    rounds x * (127 / amax) where the ops round x * (1 / (amax / 127)): 1-ulp apart, enough to flip an element by
    one step now and then, which an under-trained network amplifies (tests compare the two to one step)."""
    from pytorch_quantization.nn import TensorQuantizer

    from .models.tensor_quantizer import make_quantize_dequantize
    from .patches import PatchContext, swapped_methods

    with swapped_methods() as swaps:
        swaps.swap(TensorQuantizer, "forward", make_quantize_dequantize(PatchContext(batch_size=1)))
        yield


def sensitivity_profile(quantized: torch.nn.Module, run: Callable[[Any], dict[str, np.ndarray]],
                        reference: Sequence[dict[str, np.ndarray]], feeds: Sequence[Any]) -> list[dict]:
    """Quantize one layer at a time (all others float) and measure how far the outputs move from FP32:
    1 - the lowest cosine of any output on any sample, and the largest max-abs error. Sorted worst first."""
    layers = quant_layers(quantized)
    all_quantizers = tensor_quantizers(quantized)
    rows = []
    try:
        for q in all_quantizers:
            q.disable()
        for index, (path, layer) in enumerate(layers.items()):
            own = {id(layer._input_quantizer), id(layer._weight_quantizer)}
            for q in all_quantizers:
                q.enable() if id(q) in own else q.disable()
            worst_abs, cosines = 0.0, []
            for feed, ref in zip(feeds, reference):
                out = run(feed)
                for name, expected in ref.items():  # per output: one big output must not hide a small one
                    a, b = np.asarray(out[name], np.float64).ravel(), np.asarray(expected, np.float64).ravel()
                    worst_abs = max(worst_abs, float(np.max(np.abs(a - b))) if a.size else 0.0)
                    cosines.append(cosine(a, b))
            rows.append({"layer": path, "kind": type(layer).__name__, "one_minus_cosine": 1.0 - min(cosines),
                         "max_abs": worst_abs})
            log.info("  sensitivity %d/%d %s: 1-cos %.2e", index + 1, len(layers), path, rows[-1]["one_minus_cosine"])
    finally:
        for q in all_quantizers:
            q.enable()
    return sorted(rows, key=lambda r: -r["one_minus_cosine"])

