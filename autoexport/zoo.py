"""`autoexport zoo`: export mmdet3d's model-zoo entries one by one through the CLI and tabulate what works.

Every entry of the metafiles shipped in mmdet3d's wheel (`.mim/configs/*/metafile.yml`) is exported by
`python3 -m autoexport` in its own subprocess with a timeout, so one model's crash, hang or memory blow-up never
stops the sweep. Each verdict is appended as one JSON line to `OUTPUT/zoo_results.jsonl` (a rerun skips what is
recorded there), then the whole file is summarised in a coverage JSON and a Markdown table.

What went wrong is read from structured results only: the CLI's exit code (0 ok, 1 parity failed, 2 bad input,
3 export failed), its events file (`--events`: stages started and done, export patches, the error) and, when it got
that far, the export's metadata.json (parity per runtime and the rule that decided, export patches, op
substitutions). The log is kept for people; it is parsed only for rows of exports that wrote no events file (a
crash before the CLI started, or an older autoexport).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from .events import read_events
from .errors import (EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, EXIT_OK, EXIT_PARITY_FAILED, UserInputError,
                     signal_name)

log = logging.getLogger("autoexport")

RESULTS_FILE = "zoo_results.jsonl"
DEFAULT_OUTPUT = Path("/tmp/autoexport-zoo")  # exports are large and temporary: never inside the repository
DEFAULT_COVERAGE = Path("benchmarks/results/coverage.json")
DEFAULT_TIMEOUT_S = 900.0
ERROR_MARKER = "autoexport: error:"

# Column values.
PASS, FAIL, NOT_REACHED, SKIPPED, NOT_ASKED = "pass", "fail", "not reached", "skipped", "-"

# Verdict of a whole export, by the CLI's exit code (errors.py); anything else is a crash.
VERDICTS = {EXIT_OK: "pass", EXIT_PARITY_FAILED: "parity failed", EXIT_BAD_INPUT: "bad input",
            EXIT_EXPORT_FAILED: "export failed"}
TIMEOUT, CRASH, NOT_SHIPPED = "timeout", "crash", "config not shipped"

# Where an export stopped, in pipeline order. The CLI's stages (pipeline.StageLog) map onto these steps; the
# `export` stage holds both torch.export and the ONNX translation, told apart by the error's first words.
STEPS = ("before", "pt2", "onnx", "lower", "verify", "after")
STAGE_STEPS = {"analyze": "before", "wrap": "before", "quantize": "before", "fp16": "before", "export": "pt2",
               "lower": "lower", "verify": "verify", "fidelity": "after", "report": "after"}
ERROR_STEPS = (("ONNX translation failed", "onnx"), ("torch.export failed", "pt2"), ("lowering failed", "lower"))

STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+?)(: | done in )")
# pipeline/verify.py: "  onnxruntime    vs eager ... on sample_0  max_abs 1.10e-05  min cosine 1.0000000  pass"
PARITY_LINE = re.compile(r"^\s+(\S+)\s+vs .* on \S+\s+max_abs \S+\s+min cosine \S+\s+(pass|FAIL)\s*$")
# split.py: "  chained onnxruntime stages vs eager model: max_abs 9.30e-05  FAIL": the whole model on that runtime
CHAINED_LINE = re.compile(r"^\s+chained (\S+) stages vs .*max_abs \S+\s+(pass|FAIL)\s*$")


# ---- the model zoo ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    """One model-zoo config. Several metafile entries can name the same config (a baseline listed again in another
    family's metafile); the sweep runs each config once."""

    config: str  # config file stem: the name the CLI resolves and the key of the results file
    family: str  # the config's folder under .mim/configs (pointpillars, centerpoint, second, fcos3d, ...)
    task: str  # the metafile's Results[].Task, e.g. "3D Object Detection", "3D Semantic Segmentation"
    dataset: str  # Metadata["Training Data"], e.g. KITTI, nuScenes
    name: str  # the metafile's own Name (differs from the file stem for some entries)
    metafile: str  # family folder of the metafile that lists it
    path: Path | None  # None: the metafile names a config file that the wheel does not ship


@dataclass
class ZooIndex:
    """What the metafiles hold: raw entries (with duplicates) and the distinct configs the sweep can run."""

    root: Path
    metafiles: list[Path]
    raw_entries: int
    entries: list[ZooEntry]  # one per distinct config, in metafile order

    @property
    def families(self) -> list[str]:
        return sorted({e.family for e in self.entries})

    @property
    def not_shipped(self) -> list[ZooEntry]:
        return [e for e in self.entries if e.path is None]

    def counts(self) -> dict:
        return {"metafiles": len(self.metafiles), "entries": self.raw_entries, "configs": len(self.entries),
                "families": len(self.families), "not_shipped": len(self.not_shipped)}


def config_root() -> Path:
    """mmdet3d's `.mim/configs`, found without importing mmdet3d (that import pulls torch and mmcv: seconds)."""
    spec = importlib.util.find_spec("mmdet3d")
    if spec is None or not spec.origin:
        raise UserInputError("mmdet3d is not installed: the model zoo is read from its wheel (scripts/setup.sh)")
    return Path(spec.origin).parent / ".mim" / "configs"


def _as_list(value: object) -> list:
    return value if isinstance(value, list) else [value] if value else []


def _task(entry: dict) -> str:
    tasks = [r.get("Task") for r in _as_list(entry.get("Results")) if isinstance(r, dict) and r.get("Task")]
    return ", ".join(dict.fromkeys(tasks)) or "unknown"


def _dataset(entry: dict) -> str:
    metadata = entry.get("Metadata") if isinstance(entry.get("Metadata"), dict) else {}
    data = metadata.get("Training Data") or next((r.get("Dataset") for r in _as_list(entry.get("Results"))
                                                 if isinstance(r, dict) and r.get("Dataset")), "")
    return ", ".join(map(str, _as_list(data)))


def _locate(root: Path, config: str, name: str) -> Path | None:
    """The shipped file a metafile's `Config:` names. Some paths lack the leading `configs/`; a few are stale
    (the file was renamed to the entry's Name), so the Name is tried in the same folder last."""
    relative = Path(config)
    parts = relative.parts[1:] if relative.parts[:1] == ("configs",) else relative.parts
    candidates = [root.joinpath(*parts), root / relative.parent.name / f"{name}.py"]
    return next((p for p in candidates if p.is_file()), None)


def load_zoo(root: Path | None = None) -> ZooIndex:
    import yaml  # mmengine's dependency: always there with mmdet3d

    root = root or config_root()
    metafiles = sorted(root.glob("*/metafile.yml"))
    raw = 0
    by_config: dict[str, ZooEntry] = {}
    for metafile in metafiles:
        for item in (yaml.safe_load(metafile.read_text()) or {}).get("Models") or []:
            raw += 1
            path = _locate(root, item.get("Config", ""), item.get("Name", ""))
            stated = Path(item.get("Config", ""))
            entry = ZooEntry(config=path.stem if path else stated.stem,
                             family=path.parent.name if path else stated.parent.name or metafile.parent.name,
                             task=_task(item), dataset=_dataset(item), name=str(item.get("Name", "")),
                             metafile=metafile.parent.name, path=path)
            by_config.setdefault(entry.config, entry)  # a config listed in two metafiles runs once
    return ZooIndex(root, metafiles, raw, list(by_config.values()))


def select(index: ZooIndex, families: Iterable[str] = (), configs: Iterable[str] = ()) -> list[ZooEntry]:
    """Entries of the named families plus the named configs (by file stem or metafile Name); all when none named."""
    families, configs = list(families), list(configs)
    if not families and not configs:
        return list(index.entries)
    for family in families:
        if family not in index.families:
            raise UserInputError(f"--family {family!r} is not a model-zoo family; known: {', '.join(index.families)}")
    known = {e.config: e for e in index.entries} | {e.name: e for e in index.entries}
    for name in configs:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
            hint = ("; did you mean: " + ", ".join(close)) if close else ""
            raise UserInputError(f"--config {name!r} is not a model-zoo entry{hint}")
    picked = {known[n].config for n in configs} | {e.config for e in index.entries if e.family in families}
    return [e for e in index.entries if e.config in picked]


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N), 1 <= K <= N."""
    k, _, n = text.partition("/")
    try:
        shard, count = int(k), int(n)
    except ValueError:
        shard = count = 0
    if not 1 <= shard <= count:
        raise UserInputError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 2/4")
    return shard, count


def shard_of(entries: list[ZooEntry], shard: int, count: int) -> list[ZooEntry]:
    """The shard-th of `count` slices, the same on every machine: configs sorted by name and dealt round-robin,
    so that a family's configs (which cost alike) spread over the slices."""
    ordered = sorted(entries, key=lambda e: e.config)
    return [e for i, e in enumerate(ordered) if i % count == shard - 1]


# ---- one export -------------------------------------------------------------------------------------------------

@dataclass
class ZooResult:
    """One line of zoo_results.jsonl."""

    config: str
    family: str
    task: str
    verdict: str  # pass, parity failed, bad input, export failed, timeout, crash, config not shipped
    pt2: str  # torch.export (and, when the verify stage ran, PT2 parity): pass / fail / not reached
    onnx: str  # the ONNX translation
    ort_parity: str  # ONNX Runtime against eager PyTorch
    iree_parity: str  # IREE (compile + parity) when --backend iree, else "-"
    method: str  # native, patched, substituted op, ... (metadata.json), "-" when no export got that far
    exit_code: int | None
    wall_s: float
    reason: str  # one line for every failure, empty on pass
    stage: str | None = None  # the CLI stage it stopped in
    dataset: str = ""
    backends: list[str] = field(default_factory=list)
    parity: dict[str, str] = field(default_factory=dict)  # per runtime: pt2, onnxruntime, iree-llvm-cpu, ...
    patches: list[str] = field(default_factory=list)
    substitutions: list[str] = field(default_factory=list)
    log: str = ""
    finished: str = ""
    # OMP_NUM_THREADS of the export: float sums, and so a near-tie's side, can depend on it.
    threads: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ZooResult":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class ZooOptions:
    output: Path = DEFAULT_OUTPUT
    backends: tuple[str, ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S
    jobs: int = 1
    resume: bool = True
    keep: bool = False
    coverage_json: Path | None = DEFAULT_COVERAGE
    markdown: Path | None = None  # None: print the table to stdout
    replace_coverage: bool = False  # False: rows of configs not swept here stay in the coverage JSON
    threads: int | None = None  # per export; None: OMP_NUM_THREADS if set, else the cores split over the jobs
    shard: tuple[int, int] | None = None  # (K, N): only the K-th of N deterministic slices (shard_of)


@dataclass
class LogFacts:
    """What the export's own progress lines and error paragraph say."""

    stage: str | None  # the last stage started and not finished (None: none, or all finished)
    reason: str  # the first line of the `autoexport: error:` paragraph ("" when there is none)
    parity: dict[str, str]  # runtime -> pass/fail from the verify stage's per-sample lines
    patches: list[str]


def read_log(text: str) -> LogFacts:
    started: list[str] = []
    done: set[str] = set()
    parity: dict[str, str] = {}
    patches: list[str] = []
    lines = text.splitlines()
    reason = ""
    for i, line in enumerate(lines):
        if m := STAGE_LINE.match(line):
            (done.add if m.group(4).startswith(" done") else started.append)(m.group(3))
        elif m := PARITY_LINE.match(line) or CHAINED_LINE.match(line):
            parity[m.group(1)] = FAIL if m.group(2) == "FAIL" or parity.get(m.group(1)) == FAIL else PASS
        elif m := re.match(r"^\s+patch (\S+) \(used at", line):
            patches.append(m.group(1))
        elif ERROR_MARKER in line and not reason:
            reason = line.split(ERROR_MARKER, 1)[1].strip()
            # "parity failed:" alone says little: a header line takes its first detail line along.
            following = next((later.strip() for later in lines[i + 1:] if later.strip()), "")
            if (not reason or reason.endswith(":")) and following:
                reason = f"{reason} {following}".strip()
    stage = next((s for s in reversed(started) if s not in done), None)
    return LogFacts(stage, _one_line(reason), parity, patches)


def facts_from_events(events: list[dict]) -> LogFacts:
    """LogFacts from an export's events file (events.py) instead of its log lines."""
    started: list[str] = []
    done: set[str] = set()
    for e in events:
        if e.get("event") == "stage":
            (done.add if e.get("status") == "done" else started.append)(e.get("name"))
    exit_event = next((e for e in reversed(events) if e.get("event") == "exit"), {})
    lines = [text.strip() for text in str(exit_event.get("error", "")).splitlines() if text.strip()]
    # "parity failed:" alone says little: a header line takes its first detail line along.
    reason = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    stage = next((s for s in reversed(started) if s not in done), None)
    return LogFacts(stage, _one_line(reason), {}, [e["name"] for e in events if e.get("event") == "patch"])


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shorten_paths(reason: str, output: Path, config: str) -> str:
    """Paths into the export's (deleted) output or staging directory only lengthen a one-line reason."""
    return re.sub(rf"{re.escape(str(output))}/\.?{re.escape(config)}[^/\s]*/", "", reason)


def _crash_reason(text: str, exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        return f"killed by {signal_name(exit_code)}"
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "no output")
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
    where = f" (at {Path(frames[-1][0]).name}:{frames[-1][1]} in {frames[-1][2]})" if frames else ""
    return _one_line(f"crashed (exit {exit_code}): {last.strip()}{where}")


def export_method(metadata: dict) -> tuple[str, list[str], list[str]]:
    """(method, patches, substitutions) of an export's metadata.json. Substitutions may carry a `kind` (custom op,
    split, ...); without one they are op substitutions. Patches that only install a substitution are not counted
    twice."""
    substitutions = [s for s in metadata.get("substitutions") or [] if s]
    described = [s if isinstance(s, str) else s.get("op") or s.get("by") or json.dumps(s) for s in substitutions]
    by = {str(s.get("by", "")).split(" ")[0] for s in substitutions if isinstance(s, dict)}
    patches = [f"{p.get('target')}.{p.get('method')}" for p in metadata.get("export_patches") or []]
    kinds = ["patched"] if [p for p in patches if p not in by] else []
    kinds += [s.get("kind", "substituted op") if isinstance(s, dict) else "substituted op" for s in substitutions]
    if metadata.get("split"):  # stage graphs (with host steps between them for two-stage detectors)
        kinds.append("split")
    return " + ".join(dict.fromkeys(kinds)) or "native", patches, described


def _load_metadata(*folders: Path) -> dict | None:
    for folder in folders:
        try:
            return json.loads((folder / "metadata.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def _parity_from_metadata(metadata: dict) -> dict[str, str]:
    parity = metadata.get("parity") or {}
    found = {rt: PASS if s.get("passed") else FAIL for rt, s in (parity.get("summary") or {}).items()}
    found.update({s["runtime"]: SKIPPED for s in parity.get("skipped") or [] if s.get("runtime") not in found})
    found.update({s["runtime"]: FAIL for s in parity.get("not_built") or []})
    split = metadata.get("split")
    if split and not split.get("passed") and "onnxruntime" in found:
        # The split's stages are checked chained in ONNX Runtime: for a model whose one graph is only its first
        # stage (two-stage detectors), that is the whole model's ONNX Runtime parity.
        found["onnxruntime"] = FAIL
    return found


def classify(entry: ZooEntry, exit_code: int | None, log_text: str, metadata: dict | None,
             backends: Iterable[str], wall_s: float, timeout_s: float | None = None,
             events: list[dict] | None = None) -> ZooResult:
    """Turn an export's exit code, events (else its log) and metadata.json into one row. `timeout_s` is set when it
    was killed."""
    backends = list(backends)
    facts = facts_from_events(events) if events is not None else read_log(log_text)
    marked = bool(facts.reason)
    if timeout_s is not None:
        verdict = TIMEOUT
        reason = f"timed out after {timeout_s:g} s" + (f" (in stage {facts.stage})" if facts.stage else "")
    elif exit_code == EXIT_OK or (exit_code in VERDICTS and marked):
        verdict, reason = VERDICTS[exit_code], facts.reason
    else:  # an uncaught exception also exits 1: without the CLI's error line it is a crash, not a parity verdict
        verdict, reason = CRASH, _crash_reason(log_text, exit_code)

    parity = dict(facts.parity)
    method, patches, substitutions = "-", facts.patches, []
    if metadata is not None:
        parity = _parity_from_metadata(metadata)
        method, patches, substitutions = export_method(metadata)

    # How far it got: exit 0 and parity failures ran every step; otherwise the stage it stopped in.
    if verdict in (VERDICTS[EXIT_OK], VERDICTS[EXIT_PARITY_FAILED]):
        stopped = None
    else:
        stopped = next((step for prefix, step in ERROR_STEPS if facts.reason.startswith(prefix)), None) \
            or STAGE_STEPS.get(facts.stage or "", "before")
    order = STEPS.index(stopped) if stopped else len(STEPS)

    def column(step: str, runtime_prefix: str | None) -> str:
        runtime = next((r for r in parity if runtime_prefix and r.startswith(runtime_prefix)), None)
        if runtime:  # checked (or skipped), also when a backend's lowering failed and the others were verified
            return parity[runtime]
        at = STEPS.index(step)
        if at > order:
            return NOT_REACHED
        if at == order:  # the step it stopped in (in verify: this runner, or one before it, raised)
            return FAIL
        return PASS if step != "verify" else NOT_REACHED

    return ZooResult(
        config=entry.config, family=entry.family, task=entry.task, verdict=verdict,
        pt2=column("pt2", "pt2"), onnx=column("onnx", None),
        # Parity is checked in the verify step; IREE can already fail when it is compiled (lower).
        ort_parity=column("verify", "onnxruntime"),
        iree_parity=(FAIL if stopped == "lower" else column("verify", "iree")) if _wants_iree(backends) else NOT_ASKED,
        method=method, exit_code=exit_code, wall_s=round(wall_s, 1), reason=reason if verdict != "pass" else "",
        stage=(facts.stage or stopped) if verdict != "pass" else None, dataset=entry.dataset, backends=backends, parity=parity,
        patches=patches, substitutions=substitutions, finished=_now())


def _wants_iree(backends: Iterable[str]) -> bool:
    return any(b.split(":")[0] == "iree" for b in backends)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def not_shipped(entry: ZooEntry, index_root: Path, backends: Iterable[str]) -> ZooResult:
    folder = index_root / entry.family
    close = difflib.get_close_matches(entry.config, [p.stem for p in folder.glob("*.py")], n=1, cutoff=0.6)
    hint = f" (closest shipped: {close[0]})" if close else ""
    return ZooResult(config=entry.config, family=entry.family, task=entry.task, verdict=NOT_SHIPPED,
                     pt2=NOT_REACHED, onnx=NOT_REACHED, ort_parity=NOT_REACHED,
                     iree_parity=NOT_REACHED if _wants_iree(backends) else NOT_ASKED,
                     method="-", exit_code=None, wall_s=0.0, dataset=entry.dataset, backends=list(backends),
                     reason=f"the metafile lists {entry.family}/{entry.config}.py, which mmdet3d's wheel does not ship"
                            f"{hint}", finished=_now())


class Sweep:
    """Runs the exports; shared by the worker threads. Threads suffice as workers: each one only waits on its
    export subprocess, which is where the work (and the isolation from crashes) is."""

    def __init__(self, options: ZooOptions, index: ZooIndex, total: int) -> None:
        self.options = options
        self.index = index
        self.total = total
        self.finished = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.running: dict[str, subprocess.Popen] = {}
        self.results_path = options.output / RESULTS_FILE
        self.logs = options.output / "logs"

    def _outputs(self, entry: ZooEntry) -> list[Path]:
        out = self.options.output
        return [out / entry.config, out / f"{entry.config}.failed", *out.glob(f".{entry.config}.partial-*"),
                *out.glob(f".{entry.config}.old-*")]

    def _clean(self, entry: ZooEntry) -> None:
        for path in self._outputs(entry):
            shutil.rmtree(path, ignore_errors=True)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.options.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.options.threads)
        elif not env.get("OMP_NUM_THREADS", "").isdigit():
            # Parallel exports would each start one thread per core and fight over them; split the cores instead.
            # Always set (and recorded in the row), because the thread count can decide a near-tie's verdict.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.options.jobs))
        return env

    def command(self, entry: ZooEntry) -> list[str]:
        backend_args = [a for b in self.options.backends for a in ("--backend", b)]
        return [sys.executable, "-m", "autoexport", "--config", str(entry.path),
                "--output-dir", str(self.options.output / entry.config), "--format", "both",
                "--events", str(self.events_path(entry)), *backend_args]

    def events_path(self, entry: ZooEntry) -> Path:
        return self.logs / f"{entry.config}.events.jsonl"

    def run_entry(self, entry: ZooEntry) -> ZooResult | None:
        """Export one config in a subprocess; None when the sweep was interrupted meanwhile (nothing recorded)."""
        if entry.path is None:
            return not_shipped(entry, self.index.root, self.options.backends)
        self._clean(entry)  # an earlier interrupted run may have left a partial export (the CLI refuses those)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{entry.config}.log"
        timeout = self.options.timeout_s
        start = time.monotonic()
        env = self._env()
        with open(log_path, "w") as sink:
            # Its own process group (setsid), so a timeout kills the export and whatever it started (iree-compile) together.
            proc = subprocess.Popen(self.command(entry), stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            with self.lock:
                self.running[entry.config] = proc
            try:
                exit_code: int | None = proc.wait(timeout=timeout)
                timed_out = None
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                exit_code, timed_out = proc.returncode, timeout
            finally:
                with self.lock:
                    self.running.pop(entry.config, None)
        wall = time.monotonic() - start
        if self.stop.is_set():
            return None
        out = self.options.output
        metadata = _load_metadata(out / entry.config, out / f"{entry.config}.failed")
        row = classify(entry, exit_code, log_path.read_text(errors="replace"), metadata, self.options.backends,
                       wall, timed_out, read_events(self.events_path(entry)))
        row.log = str(log_path)
        row.threads = int(env["OMP_NUM_THREADS"])
        row.reason = shorten_paths(row.reason, out, entry.config)
        if not self.options.keep:
            self._clean(entry)
        return row

    def record(self, row: ZooResult) -> None:
        with self.lock:
            with open(self.results_path, "a") as f:
                f.write(json.dumps(row.to_json()) + "\n")
            self.finished += 1
            log.info("zoo: [%d/%d done] %s: %s in %.1f s%s", self.finished, self.total, row.config, row.verdict,
                     row.wall_s, f" ({row.reason})" if row.reason else "")

    def run_family(self, entries: list[ZooEntry]) -> None:
        for entry in entries:
            if self.stop.is_set():
                return
            log.info("zoo: start %s (%s)", entry.config, entry.family)
            try:
                row = self.run_entry(entry)
            except Exception as err:  # noqa: BLE001 - a fault of the sweep itself on one config is that config's row
                row = classify(entry, None, f"zoo could not run it: {type(err).__name__}: {err}", None,
                               self.options.backends, 0.0)
            if row is not None:
                self.record(row)

    def interrupt(self) -> None:
        self.stop.set()
        with self.lock:
            for proc in self.running.values():
                _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ---- results file, coverage, table ------------------------------------------------------------------------------

def load_results(path: Path) -> dict[str, ZooResult]:
    """The latest row per config; a line cut short by a killed sweep is ignored."""
    rows: dict[str, ZooResult] = {}
    if not path.is_file():
        return rows
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = ZooResult.from_json(json.loads(line))
        except (ValueError, TypeError):
            log.warning("zoo: %s line %d is not a result row; ignored", path, number)
            continue
        rows[row.config] = row
    return rows


def previous_rows(coverage_json: Path | None) -> dict[str, ZooResult]:
    """The rows of an existing coverage JSON, read before a sweep so that a file that is not one stops it early."""
    if coverage_json is None or not coverage_json.is_file():
        return {}
    try:
        rows = [ZooResult.from_json(r) for r in json.loads(coverage_json.read_text()).get("rows", [])]
    except (ValueError, TypeError, AttributeError) as err:
        raise UserInputError(f"{coverage_json} is not a coverage JSON written by `autoexport zoo` ({err}); move it "
                             "away or pass --replace-coverage") from None
    return {r.config: r for r in rows}


def environment() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .report import library_versions

    found = library_versions()
    for name in ("iree-base-compiler", "iree-base-runtime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    found["cpu_count"] = str(os.cpu_count())
    return found


COLUMNS = ("pt2", "onnx", "ort_parity", "iree_parity")


def meets_fp32_target(row: ZooResult) -> bool:
    """The issue's target for a config: PT2 and ONNX exported, ONNX Runtime within the fp32 tolerance (whatever
    another backend such as IREE did)."""
    return (row.pt2, row.onnx, row.ort_parity) == (PASS, PASS, PASS)


def families_meeting_target(rows: Iterable[ZooResult]) -> list[str]:
    return sorted({r.family for r in rows if meets_fp32_target(r)})


def coverage(rows: list[ZooResult], index: ZooIndex | dict, options: ZooOptions) -> dict:
    """The coverage JSON; `index` is the zoo or, when merging, the zoo counts a shard recorded."""
    by_family: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        by_family[row.family][row.verdict] += 1
    return {
        "generated": _now(),
        "environment": environment(),
        "zoo": index if isinstance(index, dict) else index.counts(),
        **({"shard": list(options.shard)} if options.shard else {}),
        "backends": list(options.backends),
        "timeout_s": options.timeout_s,
        "summary": {
            "recorded": len(rows),
            "by_verdict": dict(Counter(r.verdict for r in rows).most_common()),
            "by_column": {c: dict(Counter(getattr(r, c) for r in rows).most_common()) for c in COLUMNS},
            "by_method": dict(Counter(r.method for r in rows).most_common()),
            "by_family": {f: {"total": sum(c.values()), **dict(c.most_common())} for f, c in sorted(by_family.items())},
            "families_with_fp32_parity": families_meeting_target(rows),
        },
        "rows": [r.to_json() for r in rows],
    }


# The family table's verdict columns; rarer verdicts (timeout, crash, export failed) share "other".
FAMILY_VERDICTS = ("pass", "parity failed", "bad input", "config not shipped")


def family_table(rows: Iterable[ZooResult]) -> list[str]:
    """One Markdown row per family: its configs counted by verdict, and whether one of them meets the fp32 target,
    so a reader sees which families are covered before the per-config rows."""
    by_family: dict[str, list[ZooResult]] = defaultdict(list)
    for row in rows:
        by_family[row.family].append(row)
    lines = ["| family | task | configs | " + " | ".join(FAMILY_VERDICTS) + " | other | fp32 target |",
             "|---|---|---|" + "---|" * (len(FAMILY_VERDICTS) + 2)]
    for family, members in sorted(by_family.items()):
        counts = Counter(r.verdict for r in members)
        other = sum(n for v, n in counts.items() if v not in FAMILY_VERDICTS)
        tasks = ", ".join(sorted({r.task for r in members if r.task}))
        met = "yes" if any(meets_fp32_target(r) for r in members) else "no"
        cells = [family, tasks, str(len(members)), *(str(counts[v]) for v in FAMILY_VERDICTS), str(other), met]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(rows: list[ZooResult], title: str = "Model-zoo coverage") -> str:
    verdicts = ", ".join(f"{n} {v}" for v, n in Counter(r.verdict for r in rows).most_common())
    families = families_meeting_target(rows)
    lines = [f"# {title}", "", f"{len(rows)} configs: {verdicts or 'none'}. "
             f"{len(families)} of {len({r.family for r in rows})} families have a config exported to PT2 and ONNX "
             "with ONNX Runtime parity (fp32 target: yes in the family table).", "",
             *family_table(rows), "",
             "| config | family | PT2 | ONNX | ORT parity | IREE parity | method | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.config, r.family, r.pt2, r.onnx, r.ort_parity, r.iree_parity, r.method, r.reason or ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _ordered(rows: Iterable[ZooResult]) -> list[ZooResult]:
    return sorted(rows, key=lambda r: (r.family, r.config))


# ---- command ----------------------------------------------------------------------------------------------------

def zoo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoexport zoo",
        description="Export mmdet3d's model-zoo configs (the metafiles in its wheel) one subprocess each, record a "
                    "verdict per config in OUTPUT/zoo_results.jsonl (reruns skip recorded configs) and write a "
                    "coverage JSON and a Markdown table.")
    p.add_argument("--family", nargs="+", action="extend", default=[], metavar="NAME",
                   help="config folder(s) to sweep, e.g. pointpillars second (default: every family)")
    p.add_argument("--config", nargs="+", action="extend", default=[], metavar="NAME",
                   help="individual model-zoo configs (file stem or metafile name), added to --family's")
    p.add_argument("--jobs", type=int, default=1, help="exports running at once; families are spread over them")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help=f"exports, logs and {RESULTS_FILE} (default {DEFAULT_OUTPUT})")
    p.add_argument("--backend", action="append", default=[], metavar="KIND[:TARGET]",
                   help="also lower and check each export for this backend (e.g. iree), as `autoexport --backend`")
    p.add_argument("--threads", type=int, metavar="N",
                   help="OMP_NUM_THREADS of each export, recorded in its row (default: OMP_NUM_THREADS if set, "
                        "else the cores divided by --jobs); a rerun with the same count reproduces near-tie verdicts")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds per export before it is killed (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip configs already recorded with the same backends (default); --no-resume re-runs them")
    p.add_argument("--keep", action="store_true", help="keep each export's output directory (default: delete it)")
    p.add_argument("--coverage-json", type=Path, default=DEFAULT_COVERAGE,
                   help=f"coverage summary and rows (default {DEFAULT_COVERAGE})")
    p.add_argument("--markdown", type=Path, help="write the coverage table here (default: print it)")
    p.add_argument("--replace-coverage", action="store_true",
                   help="write only this output folder's results to the coverage JSON (default: configs it has not "
                        "recorded keep their rows from the existing coverage JSON)")
    p.add_argument("--shard", metavar="K/N",
                   help="run only the K-th of N deterministic slices of the selected configs (one per CI machine); "
                        "join their coverage files with `autoexport zoo merge`")
    p.add_argument("--list", action="store_true", help="list the selected model-zoo configs and exit")
    p.add_argument("--verbose", action="store_true", help="debug logs")
    return p


def options_from_args(args: argparse.Namespace) -> ZooOptions:
    if args.jobs < 1:
        raise UserInputError("--jobs must be at least 1")
    if args.timeout <= 0:
        raise UserInputError("--timeout must be positive")
    if args.threads is not None and args.threads < 1:
        raise UserInputError("--threads must be at least 1")
    return ZooOptions(output=args.output.expanduser().resolve(), backends=tuple(args.backend),
                      timeout_s=args.timeout, jobs=args.jobs, resume=args.resume, keep=args.keep,
                      coverage_json=args.coverage_json, markdown=args.markdown,
                      replace_coverage=args.replace_coverage, threads=args.threads,
                      shard=parse_shard(args.shard) if args.shard else None)


def run_zoo(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    index = load_zoo()
    selected = select(index, args.family, args.config)
    if options.shard:
        selected = shard_of(selected, *options.shard)
    counts = index.counts()
    log.info("zoo: %d metafiles, %d entries, %d distinct configs in %d families (%d not shipped in the wheel); "
             "%d selected%s", counts["metafiles"], counts["entries"], counts["configs"], counts["families"],
             counts["not_shipped"], len(selected),
             f" (shard {options.shard[0]}/{options.shard[1]})" if options.shard else "")
    if args.list:
        for e in selected:
            print(f"{e.family:22} {e.config:70} {e.task:28} {'' if e.path else 'NOT SHIPPED'}")
        return EXIT_OK

    previous = {} if options.replace_coverage else previous_rows(options.coverage_json)
    options.output.mkdir(parents=True, exist_ok=True)
    recorded = load_results(options.output / RESULTS_FILE)
    wanted = sorted(options.backends)
    done = {c for c, r in recorded.items() if sorted(r.backends) == wanted} if options.resume else set()
    pending = [e for e in selected if e.config not in done]
    if len(pending) < len(selected):
        log.info("zoo: %d of %d already recorded in %s (--no-resume re-runs them)", len(selected) - len(pending),
                 len(selected), options.output / RESULTS_FILE)

    sweep = Sweep(options, index, len(pending))
    families: dict[str, list[ZooEntry]] = defaultdict(list)
    for entry in pending:
        families[entry.family].append(entry)
    # Longest families first, so the last worker to finish is not the one that started the biggest family last.
    queue = sorted(families.values(), key=len, reverse=True)
    with ThreadPoolExecutor(max_workers=options.jobs, thread_name_prefix="zoo") as pool:
        futures = [pool.submit(sweep.run_family, entries) for entries in queue]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            sweep.interrupt()
            log.error("zoo: interrupted; %d results recorded in %s, a rerun resumes", sweep.finished,
                      sweep.results_path)
            return 130

    recorded = load_results(options.output / RESULTS_FILE)
    # A sweep of a few families (or into a fresh output folder) updates the table instead of replacing it.
    kept = {c: r for c, r in previous.items() if c not in recorded}
    if kept:
        log.info("zoo: %d configs not recorded in %s keep their rows from %s (--replace-coverage drops them)",
                 len(kept), options.output / RESULTS_FILE, options.coverage_json)
    rows = _ordered([*recorded.values(), *kept.values()])
    if options.coverage_json:
        options.coverage_json.parent.mkdir(parents=True, exist_ok=True)
        options.coverage_json.write_text(json.dumps(coverage(rows, index, options), indent=2) + "\n")
        log.info("zoo: coverage of %d configs written to %s", len(rows), options.coverage_json)
    table = markdown_table(rows)
    if options.markdown:
        options.markdown.parent.mkdir(parents=True, exist_ok=True)
        options.markdown.write_text(table)
        log.info("zoo: table written to %s", options.markdown)
    else:
        print(table, end="")
    return EXIT_OK


# ---- merge --------------------------------------------------------------------------------------------------------

def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoexport zoo merge",
        description="Join the coverage JSONs (or zoo_results.jsonl files) of several sweeps, e.g. the shards of a CI "
                    "matrix, into one coverage JSON and Markdown table. A config recorded twice keeps its latest row.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--coverage-json", type=Path, default=DEFAULT_COVERAGE,
                   help=f"where to write the joined coverage (default {DEFAULT_COVERAGE})")
    p.add_argument("--markdown", type=Path, help="write the coverage table here (default: print it)")
    p.add_argument("--verbose", action="store_true")
    return p


def _rows_of(path: Path) -> tuple[list[ZooResult], dict]:
    """A coverage JSON's rows and its header, or a results file's rows."""
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        return list(load_results(path).values()), {}
    try:
        data = json.loads(path.read_text())
        return [ZooResult.from_json(r) for r in data["rows"]], data
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserInputError(f"{path} is not a coverage JSON written by `autoexport zoo` ({err})") from None


def merge(paths: list[Path]) -> tuple[list[ZooResult], dict]:
    """Rows of every file, the latest per config (`finished`); the header of the first coverage JSON."""
    rows: dict[str, ZooResult] = {}
    header: dict = {}
    for path in paths:
        found, data = _rows_of(path)
        header = header or data
        for row in found:
            if row.config not in rows or row.finished >= rows[row.config].finished:
                rows[row.config] = row
    return _ordered(rows.values()), header


def run_merge(argv: list[str]) -> int:
    args = merge_parser().parse_args(argv)
    rows, header = merge(args.files)
    options = ZooOptions(backends=tuple(header.get("backends", ())), timeout_s=header.get("timeout_s", DEFAULT_TIMEOUT_S),
                         coverage_json=args.coverage_json, markdown=args.markdown)
    data = coverage(rows, header.get("zoo", {}), options)
    data["merged_from"] = [str(p) for p in args.files]
    args.coverage_json.parent.mkdir(parents=True, exist_ok=True)
    args.coverage_json.write_text(json.dumps(data, indent=2) + "\n")
    log.info("zoo merge: %d configs from %d files written to %s", len(rows), len(args.files), args.coverage_json)
    table = markdown_table(rows)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    else:
        print(table, end="")
    return EXIT_OK
