"""Stage 1, analyze: build the model, run the real test pipeline and data preprocessor on samples,
and describe the nested inputs and raw outputs as a flat tensor manifest."""

from __future__ import annotations

import copy
import logging
import random
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import camera
from . import samples as sample_data
from .checkpoint import load_checkpoint_strict
from .configs import load_config
from .boundaries import (TensorBoundary, boundary_for, describe_boundary, heads_of, output_namer_for,
                         predict_forward)
from .errors import ExportFailedError, UserInputError, first_line
from .export import innermost_model_frame
from .manifest import (METAINFO_TENSOR_KEYS, identifier, DynamicDim, Manifest, OutputSpec, TensorSpec, describe_input, dim_name_for, dtype_name,
                       get_by_path, iter_tensors, metainfo_path, parse_metainfo_path, path_to_identifier,
                       path_to_str)

log = logging.getLogger("autoexport")


@dataclass
class PreparedSample:
    """A sample after the test pipeline and the data preprocessor: what the model's forward receives."""

    name: str
    role: str  # "export" or "heldout"
    origin: str
    num_points: int
    inputs: dict
    data_samples: list

    def metainfo_tensors(self) -> dict[str, torch.Tensor]:
        """Numeric camera/lidar matrices of the metainfo as float32 tensors, by path 'metainfo.<i>.<key>'."""
        found = {}
        for index, sample in enumerate(self.data_samples):
            for key in METAINFO_TENSOR_KEYS:
                value = sample.metainfo.get(key)
                if value is None:
                    continue
                try:
                    array = np.asarray(value, dtype=np.float32)
                except (TypeError, ValueError):
                    continue
                if array.ndim >= 2:
                    found[metainfo_path(index, key)] = torch.from_numpy(array)
        return found

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a manifest input can name: the model inputs ('inputs.…') and metainfo matrices."""
        return {**{path_to_str(("inputs",) + p): t for p, t in iter_tensors(self.inputs)}, **self.metainfo_tensors()}


@dataclass
class Analysis:
    model: torch.nn.Module
    cfg: Any
    config_path: Path
    checkpoint: str | None
    model_type: str
    device: str
    boundary: TensorBoundary
    samples: list[PreparedSample]
    manifest: Manifest
    metainfo: list[dict]  # data sample metainfo per batch item, as recorded from the first export sample
    preprocess: dict = field(default_factory=dict)
    # Random weights: modules whose own init_weights() raised (init_random_weights), each with its error.
    init_failures: list[str] = field(default_factory=list)
    postprocess: dict = field(default_factory=dict)

    @property
    def export_samples(self) -> list[PreparedSample]:
        return [s for s in self.samples if s.role == "export"]


# ---- model ---------------------------------------------------------------------------------------

def drop_pretrained_init(node: Any, dropped: list[str], where: str = "model") -> Any:
    """Remove `init_cfg=dict(type='Pretrained', ...)` and `pretrained=...`: they download weights at
    init time, which fails offline and is pointless when a checkpoint or random weights are wanted."""
    if isinstance(node, dict):
        for key in list(node.keys()):
            value = node[key]
            if key == "pretrained" and isinstance(value, str):
                dropped.append(f"{where}.pretrained={value}")
                node[key] = None
            elif key == "init_cfg" and isinstance(value, dict) and value.get("type") == "Pretrained":
                dropped.append(f"{where}.init_cfg={value.get('checkpoint')}")
                node[key] = None
            elif key == "init_cfg" and isinstance(value, list):
                kept = [v for v in value if not (isinstance(v, dict) and v.get("type") == "Pretrained")]
                dropped.extend(f"{where}.init_cfg={v.get('checkpoint')}" for v in value if v not in kept)
                node[key] = kept or None
            else:
                drop_pretrained_init(value, dropped, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            drop_pretrained_init(value, dropped, f"{where}[{index}]")
    return node


def build_model(cfg: Any, device: str, seed: int, for_training: bool = False) -> torch.nn.Module:
    import mmdet3d.datasets.transforms  # noqa: F401  registers the pipeline transforms
    import mmdet3d.models  # noqa: F401  registers models; not register_all_modules, whose metrics need dataset SDKs
    from mmdet3d.apis.inference import convert_SyncBN
    from mmdet3d.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope(cfg.get("default_scope", "mmdet3d"))
    if "model" not in cfg:
        raise UserInputError("the config has no `model` section")
    model_cfg = copy.deepcopy(cfg.model)
    convert_SyncBN(model_cfg)
    if not for_training:
        model_cfg.train_cfg = None  # assigners and samplers: training only
    dropped: list[str] = []
    drop_pretrained_init(model_cfg, dropped)
    for entry in dropped:
        log.info("  ignoring pretrained-weights download in the config: %s", entry)
    torch.manual_seed(seed)  # random weights are reproducible when no checkpoint is given
    try:
        model = MODELS.build(model_cfg)
    except KeyError as err:
        raise UserInputError(f"the config's model could not be built: {err}. If it is defined outside mmdet3d, "
                             "add its package to the config's custom_imports") from None
    except ImportError as err:  # mmdet3d imports optional libraries (MinkowskiEngine) inside __init__
        raise _missing_library(err, "") from None
    except (AssertionError, TypeError, ValueError) as err:  # the classes validate their arguments this way
        frame = traceback.extract_tb(err.__traceback__)[-1]
        if "install" in str(err).lower():  # mmdet3d asserts optional libraries (torchsparse, MinkowskiEngine) this way
            raise _missing_library(err, f" (asserted at {Path(frame.filename).name}:{frame.lineno})") from None
        raise UserInputError(f"the config's model could not be built: {type(err).__name__}: {err or '(assertion)'} "
                             f"at {Path(frame.filename).name}:{frame.lineno} ({frame.line}); check the arguments "
                             "of that module in the config") from None
    model.cfg = cfg
    model.dataset_meta = {"classes": list(cfg.get("class_names", []))}
    model.requires_grad_(False)  # an inference export: parameters in model.pt2 need no grad
    # Not `model.to(device).eval()`: some detectors override train() without returning self (ImVoteNet),
    # so eval() returns None there.
    model.to(device)
    model.eval()
    return model


def _missing_library(err: Exception, where: str) -> UserInputError:
    return UserInputError(f"the config's model needs a library that is not installed here: {err}{where}. What to "
                          "do: install it; autoexport's op library has no substitute for it")


def init_random_weights(model: torch.nn.Module) -> list[str]:
    """The model's own init_cfg (Kaiming for convs, prior-probability bias for classifiers).

    PyTorch's default init shrinks activations ~3x per layer, so after a 20-layer backbone the raw
    outputs are almost only head biases and a parity check would compare constants. A module whose own
    init_weights() raises (mmdet3d 1.4's MonoFlexHead reads layers it never builds) has its children initialised
    one by one instead; returns those modules, each with its error."""
    from mmengine.logging import MMLogger

    mmengine_logger = MMLogger.get_current_instance()  # init_weights logs every parameter at INFO
    level = mmengine_logger.level
    mmengine_logger.setLevel(logging.WARNING)
    failed: list[str] = []
    try:
        _init_subtree(model, "", failed)
    finally:
        mmengine_logger.setLevel(level)
        # mmengine's bookkeeping dict keyed by Parameters, which only a top-level call that returns deletes; left
        # on the modules, torch.export compares it key by key (printing every parameter) and takes hours.
        for module in model.modules():
            module.__dict__.pop("_params_init_info", None)
    for failure in failed:
        log.info("  init_weights() of %s; its sub-modules were initialised one by one instead", failure)
    return failed


def _init_subtree(module: torch.nn.Module, path: str, failed: list[str]) -> None:
    """module.init_weights(), or where it raises, its children's; records the deepest modules that raised (a
    parent fails with its faulty child)."""
    error = ""
    if hasattr(module, "init_weights"):
        try:
            module.init_weights()
            return
        except Exception as err:  # noqa: BLE001 - a bug of that module's init: fall back to its children's
            error = f"{path or 'the model'} ({type(module).__name__}) raised {type(err).__name__}: {first_line(str(err))}"
    before = len(failed)
    for name, child in module.named_children():
        if not getattr(child, "is_init", False):  # mmengine's mark: the failed call had initialised it already
            _init_subtree(child, f"{path}.{name}" if path else name, failed)
    if error and len(failed) == before:
        failed.append(error)


def calibrate_batchnorm(model: torch.nn.Module, forward: Any, samples: list["PreparedSample"]) -> int:
    """Random weights only: set BatchNorm running statistics from the samples (cumulative average), so
    every layer sees unit-scale activations as in a trained model. Returns the number of BN layers."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        with torch.no_grad():
            for sample in samples:
                forward(model, _clone_nested(sample.inputs), sample.data_samples)
    finally:
        model.eval()
    return len(norms)


# ---- samples -------------------------------------------------------------------------------------

@dataclass
class SampleSpec:
    """What the config's test pipeline reads and how to synthesize it."""

    pipeline: list[dict]
    fmt: "sample_data.PointCloudFormat"
    box_type_3d: Any
    box_mode_3d: Any
    cameras: "sample_data.CameraSampling | None"  # None: lidar-only pipeline

    def synthesize(self, folder: Path, seed: int, **points: Any) -> list["sample_data.SampleSource"]:
        return sample_data.synthesize_samples(self.fmt, folder, seed, self.box_type_3d, self.box_mode_3d,
                                              cameras=self.cameras, **points)

    def reject_user_files(self, what: str) -> None:
        if self.cameras is not None:
            raise UserInputError(f"{what} are point cloud files, but this config's test pipeline loads images; "
                                 "user camera samples are not supported yet: leave them out to use synthesized "
                                 "camera samples")


def _sample_spec(cfg: Any, workdir: Path | None = None) -> SampleSpec:
    from mmdet3d.structures import get_box_type

    pipeline_cfg = sample_data.test_pipeline_of(cfg)
    modalities = sample_data.modalities_of(pipeline_cfg)
    if not modalities:
        raise UserInputError("the config's test pipeline loads neither a point cloud (LoadPointsFromFile) nor "
                             "images (LoadImageFromFile*)")
    dataset_cfg = cfg.get("test_dataloader", {}).get("dataset", {})
    box_type_3d, box_mode_3d = get_box_type(dataset_cfg.get("box_type_3d", "LiDAR"))
    if "lidar" in modalities:
        fmt = sample_data.point_cloud_format(cfg, pipeline_cfg)
    else:
        fmt = sample_data.camera_scene_format(cfg)
    cameras = None
    if "camera" in modalities:
        rig = camera.rig_for(fmt.dataset_type)
        folder = workdir or Path(tempfile.gettempdir())
        cameras = sample_data.CameraSampling(rig, camera.dataset_for_parsing(cfg, folder), "lidar" in modalities)
    return SampleSpec(pipeline_cfg, fmt, box_type_3d, box_mode_3d, cameras)


@contextmanager
def _seeded_host_random(seed: int) -> Iterator[None]:
    """numpy's and Python's global generators seeded for one pipeline run, then restored. Test pipelines draw from
    them (PointSample picks its points with np.random.choice), so unseeded the same sample file gave other inputs,
    and other parity numbers, on every run."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _run_pipeline(model: torch.nn.Module, pipeline_cfg: list[dict], sources: list[sample_data.SampleSource],
                  seed: int, quiet: bool = False, boundary: TensorBoundary | None = None) -> list[PreparedSample]:
    host_inputs = (boundary or boundary_for(model)[0]).host_inputs
    from mmengine.dataset import Compose, pseudo_collate

    pipeline = Compose(pipeline_cfg)
    prepared = []
    for ordinal, source in enumerate(sources):
        try:
            with tempfile.TemporaryDirectory(prefix="autoexport-masks-") as masks:
                sample_data.add_annotation_stand_ins([source], pipeline_cfg, Path(masks))
                with _seeded_host_random(seed * 1000 + ordinal):
                    packed = pipeline(copy.deepcopy(source.info))
        except Exception as err:
            raise UserInputError(f"the test pipeline failed on {source.origin}: {type(err).__name__}: {err}") from None
        if isinstance(packed, list) and len(packed) == 1:
            # One augmented view packed inside MultiScaleFlipAug3D (Waymo configs): no test-time augmentation,
            # the same unwrapping Pack3DDetInputs does for a one-view list.
            packed = packed[0]
        _check_points_left(packed, source, pipeline_cfg)
        try:
            with torch.no_grad():
                batch = model.data_preprocessor(pseudo_collate([packed]), False)
        except Exception as err:  # the preprocessor is mmdet3d's code: say where it failed, not a traceback
            # The model code's line (mmdet3d/mmcv/...), not torch's own raise.
            where = innermost_model_frame(err) or "a line outside mmdet3d/mmcv"
            device = next(model.parameters()).device
            hint = (" It moves tensors to CUDA itself: run on a CUDA machine (--device cuda)."
                    if "CUDA" in str(err) and device.type == "cpu" else "")
            raise ExportFailedError(f"the data preprocessor ({type(model.data_preprocessor).__name__}) failed on "
                                    f"sample {source.name} ({source.origin}) on {device.type}: "
                                    f"{type(err).__name__}: {err} at {where}.{hint}") from None
        if not isinstance(batch, dict) or "inputs" not in batch:
            # e.g. a test pipeline that packs a list of augmented views (test-time augmentation)
            raise ExportFailedError(f"the data preprocessor ({type(model.data_preprocessor).__name__}) returned a "
                                    f"{type(batch).__name__}, not a dict with 'inputs'; the test pipeline "
                                    f"({' -> '.join(str(t.get('type')) for t in pipeline_cfg)}) probably packs "
                                    "several augmented views. What to do: export with a config whose test "
                                    "pipeline has no test-time augmentation")
        if host_inputs is not None:  # e.g. a segmentor's sliding patches: host-side work before the graph
            with torch.no_grad():
                batch["inputs"] = host_inputs(model, batch["inputs"], batch["data_samples"], ordinal)
        prepared.append(PreparedSample(source.name, source.role, source.origin, source.num_points,
                                       batch["inputs"], batch["data_samples"]))
        if not quiet:
            images = [f for f in source.files if f.suffix in (".png", ".jpg")]
            what = [f"{source.num_points} points"] if source.num_points else []
            what += [f"{len(images)} image{'s' if len(images) > 1 else ''}"] if images else []
            log.info("  %s: %s (%s)", source.name, " + ".join(what), source.origin)
    return prepared


def _check_points_left(packed: Any, source: sample_data.SampleSource, pipeline_cfg: list[dict]) -> None:
    """A cloud the test pipeline filtered down to nothing (every point outside PointsRangeFilter's range) is the
    user's input, not a model failure: say so before the model meets zero points."""
    points = packed.get("inputs", {}).get("points") if isinstance(packed, dict) else None
    if points is None or len(points) > 0:
        return
    ranges = [t.get("point_cloud_range") for t in sample_data.iter_pipeline_transforms(pipeline_cfg)
              if t.get("type") == "PointsRangeFilter"]
    where = f"the test pipeline's point_cloud_range {list(ranges[0])}" if ranges else "the test pipeline's filters"
    raise UserInputError(f"sample {source.origin}: no point of its {source.num_points} lies inside {where}; pass a "
                         "cloud in the dataset's coordinate frame with points in that range")


def prepare_samples(model: torch.nn.Module, cfg: Any, sample_files: list[Path], workdir: Path,
                    seed: int, boundary: TensorBoundary | None = None,
                    data_info: tuple[Path, Path | None] | None = None) -> tuple[list[PreparedSample], dict]:
    """Run the config's test pipeline and the model's data preprocessor on each sample: the user's point files,
    the records of the user's info file (data_info: the .pkl and its data root), or synthesized scenes."""
    spec = _sample_spec(cfg, workdir)
    pipeline_cfg, fmt = spec.pipeline, spec.fmt
    if data_info:
        sources = sample_data.info_file_samples(data_info[0], data_info[1], cfg, fmt, workdir, seed)
    elif sample_files:
        spec.reject_user_files("--sample files")
        sources = sample_data.user_samples(sample_files, fmt, workdir, seed, spec.box_type_3d, spec.box_mode_3d)
    else:
        sources = spec.synthesize(workdir, seed)
    prepared = _run_pipeline(model, pipeline_cfg, sources, seed, boundary=boundary)
    preprocess = {
        "point_cloud": {"load_dim": fmt.load_dim, "use_dim": fmt.use_dim, "sweeps_num": fmt.sweeps_num,
                        "point_cloud_range": fmt.point_cloud_range, "dataset_type": fmt.dataset_type},
        "test_pipeline": [t.get("type") for t in pipeline_cfg],
        "data_preprocessor": _plain(cfg.model.get("data_preprocessor", {})),
    }
    return prepared, preprocess


def prepare_more_samples(analysis: "Analysis", role: str, count: int, files: list[Path], seed: int) -> list[PreparedSample]:
    """`count` further samples through the same test pipeline and data preprocessor: the user's files first
    (sorted), synthesized scenes (point counts 12k-28k, their own seed) for the rest."""
    with tempfile.TemporaryDirectory(prefix=f"autoexport-{role}-") as workdir:
        spec = _sample_spec(analysis.cfg, Path(workdir))
        if files:
            spec.reject_user_files(f"{role} files")
        sources = sample_data.file_sources(files[:count], spec.fmt, role, spec.box_type_3d, spec.box_mode_3d)
        missing = count - len(sources)
        if missing > 0:
            rng = np.random.default_rng(seed)
            sizes = tuple(int(n) for n in rng.integers(12000, 28001, missing))
            synthesized = spec.synthesize(Path(workdir), seed, export_points=(), heldout_points=sizes)
            for offset, source in enumerate(synthesized):
                source.name, source.role = f"{role}_{len(sources) + offset}", role
            sources += synthesized
        return _run_pipeline(analysis.model, spec.pipeline, sources, seed, quiet=True, boundary=analysis.boundary)


# ---- manifest ------------------------------------------------------------------------------------

class _TensorUseRecorder(TorchFunctionMode):
    """Records which of the watched tensors any torch function receives."""

    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        for leaf in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.watched:
                self.used.add(self.watched[id(leaf)])
        return func(*args, **(kwargs or {}))


def _clone_nested(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone_nested(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_nested(v) for v in obj)
    return obj


def prune_nested(obj: Any, keep: set[str], prefix: tuple = ()) -> Any:
    """Drop tensor leaves whose path is not in `keep`; containers left empty are dropped too."""
    if isinstance(obj, torch.Tensor):
        return obj if path_to_str(prefix) in keep else None
    if isinstance(obj, dict):
        pruned = {k: prune_nested(v, keep, prefix + (k,)) for k, v in obj.items()}
        return {k: v for k, v in pruned.items() if v is not None} or None
    if isinstance(obj, (list, tuple)):
        items = [prune_nested(v, keep, prefix + (i,)) for i, v in enumerate(obj)]
        return None if all(v is None for v in items) else type(obj)(items)
    return obj


def _outputs_equal(a: Any, b: Any) -> bool:
    fa, fb = list(iter_tensors(a)), list(iter_tensors(b))
    return len(fa) == len(fb) and all(pa == pb and torch.equal(ta, tb) for (pa, ta), (pb, tb) in zip(fa, fb))


def _find_dynamic_dims(per_sample: list[dict[str, torch.Tensor]]) -> dict[tuple[str, int], tuple[int, ...]]:
    """(path, dim) -> values across samples, for every dim that is not the same in all samples."""
    varying = {}
    for path, tensor in per_sample[0].items():
        for dim in range(tensor.dim()):
            values = tuple(int(s[path].shape[dim]) for s in per_sample)
            if len(set(values)) > 1:
                varying[(path, dim)] = values
    return varying


@contextmanager
def explain_eager_failures(model: torch.nn.Module, device: str, verbose: bool, context: str = "") -> Iterator[None]:
    """Around the analyzer's own eager runs: a failure there is not an export problem; name the module and op, and
    (`context`) the registry entry whose tensor path ran."""
    from .export import ModuleTracker, describe_export_failure

    tracker = ModuleTracker(model)
    try:
        yield
    except UserInputError:
        raise
    except Exception as err:
        raise ExportFailedError(describe_export_failure(f"the eager PyTorch run on {device}", err, tracker.stack,
                                                        verbose, context)) from err
    finally:
        tracker.remove()


def build_manifest(model: torch.nn.Module, boundary: TensorBoundary, forward: Any,
                   samples: list[PreparedSample]) -> Manifest:
    export_samples = [s for s in samples if s.role == "export"]
    flat = [{path_to_str(("inputs",) + p): t for p, t in iter_tensors(s.inputs)} for s in export_samples]
    _check_same_structure(export_samples, flat)
    first = export_samples[0]
    probe = _probe_inputs(model, forward, export_samples)
    unused = _confirmed_unused(model, forward, first, [p for p in flat[0] if p not in probe.used], probe.used)
    # Dynamic dims: a dim that differs between export samples; dims with identical values share a name.
    varying = _find_dynamic_dims([{k: v for k, v in f.items() if k not in unused} for f in flat])
    dims: dict[str, DynamicDim] = {}
    by_values: dict[tuple[int, ...], str] = {}
    specs = _input_specs(flat[0], unused, varying, probe, boundary, dims, by_values)
    out_specs = _output_specs(model, boundary, forward, probe.outputs, export_samples[1], by_values)
    structure = _structure_of(first.inputs, ("inputs",), {s.path: s.name for s in specs})
    return Manifest(inputs=specs, outputs=out_specs, dims=dims, structure=structure, unused_inputs=unused,
                    batch_size=len(first.data_samples))


def _check_same_structure(export_samples: list[PreparedSample], flat: list[dict[str, torch.Tensor]]) -> None:
    for sample, tensors in zip(export_samples[1:], flat[1:]):
        if list(tensors) != list(flat[0]) or any(tensors[k].dtype != flat[0][k].dtype or tensors[k].dim() != flat[0][k].dim()
                                                for k in tensors):
            raise UserInputError(f"sample {sample.name} produced a different input structure than {export_samples[0].name}; "
                                 "samples must come from the same dataset format")


@dataclass
class _Probe:
    """What one eager run of the tensor path showed: its outputs, the inputs it read and wrote into, and the
    metainfo matrices it computed with."""

    outputs: Any
    used: set[str]
    mutated: set[str]
    meta_tensors: dict[str, torch.Tensor]
    meta_used: list[str]


def _probe_inputs(model: torch.nn.Module, forward: Any, export_samples: list[PreparedSample]) -> _Probe:
    """Which inputs the model reads, and which it writes into (e.g. PillarFeatureNet's legacy mode)."""
    first = export_samples[0]
    inputs = _clone_nested(first.inputs)
    before = {path_to_str(("inputs",) + p): t.clone() for p, t in iter_tensors(inputs)}
    recorder = _TensorUseRecorder({id(t): path_to_str(("inputs",) + p) for p, t in iter_tensors(inputs)})
    # Metainfo matrices go in as tensors too: those a torch function receives are inputs, the rest stay constants.
    meta_tensors = first.metainfo_tensors()
    recorder.watched.update({id(t): path for path, t in meta_tensors.items()})
    probe_samples = with_metainfo_tensors(first.data_samples, meta_tensors)
    with torch.no_grad(), recorder:
        outputs = forward(model, inputs, probe_samples)
    meta_used = sorted(p for p in meta_tensors if p in recorder.used)
    for other in export_samples[1:]:
        other_tensors = other.metainfo_tensors()
        for path in meta_used:
            if other_tensors[path].shape != meta_tensors[path].shape:
                raise UserInputError(f"metainfo {path} has a different shape in {other.name} than in {first.name}")
    for path in meta_used:
        log.info("  metainfo %s is read by the model's tensor path: a named input", path)
    after = {path_to_str(("inputs",) + p): t for p, t in iter_tensors(inputs)}
    mutated = {k for k in before if not torch.equal(before[k], after[k])}
    for path in sorted(mutated):
        log.warning("  input mutation: the model writes into %s in place; every run gets a fresh copy", path)
    return _Probe(outputs, recorder.used - set(meta_tensors), mutated, meta_tensors, meta_used)


def _confirmed_unused(model: torch.nn.Module, forward: Any, first: PreparedSample, unused: list[str],
                      used: set[str]) -> list[str]:
    """Inputs left out of the signature: only where the model gives identical outputs without them."""
    if not unused:
        return []
    pruned = prune_nested(_clone_nested(first.inputs), {p[len("inputs."):] for p in used}) or {}
    try:
        with torch.no_grad():
            same = _outputs_equal(forward(model, pruned, first.data_samples),
                                  forward(model, _clone_nested(first.inputs), first.data_samples))
    except Exception:  # noqa: BLE001 - the model needs them after all
        same = False
    if not same:
        return []
    log.info("  inputs the model never reads (left out of the signature): %s", ", ".join(unused))
    return unused


def _unique_name(name: str, names: set[str]) -> str:
    while name in names:
        name += "_"
    names.add(name)
    return name


def _input_specs(tensors: dict[str, torch.Tensor], unused: list[str], varying: dict, probe: _Probe,
                 boundary: TensorBoundary, dims: dict[str, DynamicDim], by_values: dict) -> list[TensorSpec]:
    """One spec per input the model reads, then the metainfo matrices it computes with; fills dims/by_values."""
    specs: list[TensorSpec] = []
    names: set[str] = set()
    for path, tensor in tensors.items():
        if path in unused:
            continue
        name = _unique_name(path_to_identifier(path), names)
        dynamic: dict[int, str] = {}
        for dim in range(tensor.dim()):
            values = varying.get((path, dim))
            if values is None:
                continue
            if values not in by_values:
                dim_name = dim_name_for(path, dim, name, tensor.dim(), boundary.input_meanings)
                while dim_name in dims:
                    dim_name += "_"
                by_values[values] = dim_name
                dims[dim_name] = DynamicDim(dim_name, list(values))
            dynamic[dim] = by_values[values]
        specs.append(TensorSpec(name=name, path=path, shape=list(tensor.shape), dtype=dtype_name(tensor.dtype),
                                dynamic_dims=dynamic,
                                description=describe_input(path, tensor.dim(), boundary.input_meanings),
                                mutated_by_model=path in probe.mutated))
    for path in probe.meta_used:
        tensor = probe.meta_tensors[path]
        specs.append(TensorSpec(name=_unique_name(path_to_identifier(path), names), path=path,
                                shape=list(tensor.shape), dtype=dtype_name(tensor.dtype),
                                description=describe_input(path)))
    return specs


def _output_specs(model: torch.nn.Module, boundary: TensorBoundary, forward: Any, outputs: Any,
                  second: PreparedSample, by_values: dict) -> list[OutputSpec]:
    """The raw head outputs flattened and named through the head's output namer; dynamic where the second export
    sample's differ."""
    namer = output_namer_for(model, boundary)
    with torch.no_grad():
        second_outputs = forward(model, _clone_nested(second.inputs), second.data_samples)
    out_specs = []
    for path, tensor in iter_tensors(outputs):
        other = get_by_path(second_outputs, path)
        dynamic = {}
        for dim in range(tensor.dim()):
            values = (int(tensor.shape[dim]), int(other.shape[dim]))
            if values[0] != values[1]:
                dynamic[dim] = by_values.get(values) or f"{identifier(namer(path))}_dim{dim}"
        out_specs.append(OutputSpec(name=identifier(namer(path)), index_path=list(path), shape=list(tensor.shape),
                                    dtype=dtype_name(tensor.dtype), dynamic_dims=dynamic))
    if len({o.name for o in out_specs}) != len(out_specs):
        raise RuntimeError(f"output names collide: {[o.name for o in out_specs]}")
    if not out_specs:
        raise UserInputError(f"{type(model).__name__}'s tensor forward returned no tensors; nothing to export")
    return out_specs


def with_metainfo_tensors(data_samples: list, tensors: dict[str, torch.Tensor]) -> list:
    """Copies of the data samples whose metainfo holds the given tensors ('metainfo.<i>.<key>') instead."""
    copies = []
    for index, sample in enumerate(data_samples):
        copy_ = sample.clone()
        for path, tensor in tensors.items():
            batch_index, key = parse_metainfo_path(path)
            if batch_index == index:
                copy_.set_field(tensor, key, field_type="metainfo")
        copies.append(copy_)
    return copies


def _structure_of(obj: Any, prefix: tuple, names: dict[str, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = names.get(path_to_str(prefix))
        return {"tensor": name} if name else None
    if isinstance(obj, dict):
        items = {k: _structure_of(v, prefix + (k,), names) for k, v in obj.items()}
        return {k: v for k, v in items.items() if v is not None} or None
    if isinstance(obj, (list, tuple)):
        items = [_structure_of(v, prefix + (i,), names) for i, v in enumerate(obj)]
        return None if all(v is None for v in items) else items
    return None


def _plain(obj: Any) -> Any:
    """Config sections as JSON-friendly plain data."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def postprocess_info(model: torch.nn.Module, cfg: Any, boundary: TensorBoundary) -> dict:
    """What a host-side decoder needs: head classes, their config (anchors, box coder) and test_cfg."""
    heads = heads_of(model, boundary)
    model_cfg = cfg.model
    head_cfgs = {attr: _plain(model_cfg.get(attr)) for attr in boundary.head_attrs if model_cfg.get(attr) is not None}
    return {"head_types": [type(h).__name__ for h in heads], "heads": head_cfgs,
            "test_cfg": _plain(model_cfg.get("test_cfg", {})),
            **({"host_side": boundary.host_side} if boundary.host_side else {}),
            "classes": list(getattr(model, "dataset_meta", {}).get("classes", []))}


def analyze(config_path: Path, checkpoint: str | None, device: str, sample_files: list[Path],
            seed: int = 0, verbose: bool = False, trust_checkpoint: bool = False, scope: str = "network",
            data_info: tuple[Path, Path | None] | None = None) -> Analysis:
    cfg = load_config(config_path)
    model = build_model(cfg, device, seed)
    init_failures: list[str] = []
    if checkpoint:
        load_checkpoint_strict(model, checkpoint, trust_checkpoint)
    else:
        init_failures = init_random_weights(model)
    log.info("  model %s: %.2f M parameters, %s weights", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, "checkpoint" if checkpoint else "random")
    boundary, forward = boundary_for(model)
    if scope == "detections":
        from .detections import detections_boundary

        boundary = detections_boundary(model, cfg)
        forward = boundary.forward
    with tempfile.TemporaryDirectory(prefix="autoexport-samples-") as workdir:
        samples, preprocess = prepare_samples(model, cfg, sample_files, Path(workdir), seed, boundary, data_info)
    context = describe_boundary(model)
    with explain_eager_failures(model, device, verbose, context):
        if not checkpoint:
            # A two-stage detector's one graph is its first stage; its RoI head's BatchNorms see the samples only
            # through the whole model (mmdet3d's predict, host NMS included).
            calibrated = calibrate_batchnorm(model, predict_forward if boundary.split_required else forward,
                                             [s for s in samples if s.role == "export"])
            log.info("  random weights: init_weights() and BatchNorm statistics of %d layers from the export "
                     "samples", calibrated)
        manifest = build_manifest(model, boundary, forward, samples)
    metainfo = [dict(s.metainfo) for s in samples[0].data_samples]
    return Analysis(model=model, cfg=cfg, config_path=config_path, checkpoint=checkpoint,
                    model_type=type(model).__name__, device=device, boundary=boundary, samples=samples,
                    manifest=manifest, metainfo=metainfo, preprocess=preprocess,
                    postprocess=postprocess_info(model, cfg, boundary), init_failures=init_failures)
