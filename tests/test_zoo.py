"""`autoexport zoo`: metafile enumeration, verdicts read from real exports in subprocesses, resume, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoexport import zoo
from autoexport.cli import main
from conftest import KITTI_PP

FCOS3D = "fcos3d_r101-caffe-dcn_fpn_head-gn_8xb2-1x_nus-mono3d"
# Its backbone asserts torchsparse is installed (it is not): the export stops in analyze (exit 2) after ~6 s.
MINKUNET = "minkunet18_w16_torchsparse_8xb2-amp-15e_semantickitti"


# ---- enumeration --------------------------------------------------------------------------------------------------

def test_metafiles_enumerate_the_model_zoo():
    index = zoo.load_zoo()
    # mmdet3d 1.4.0's wheel: 29 metafiles listing 116 entries. Two configs are listed twice (a PointPillars FPN and
    # a RegNet baseline, again in free_anchor's metafile), so 114 distinct configs; 12 name files the wheel lacks.
    assert index.counts() == {"metafiles": 29, "entries": 116, "configs": 114, "families": 29, "not_shipped": 12}
    assert {"pointpillars", "centerpoint", "second", "fcos3d", "votenet", "minkunet"} <= set(index.families)
    for entry in index.entries:
        assert entry.path is None or entry.path.is_file(), entry
        assert entry.path is None or (entry.path.parent.name == entry.family and entry.path.stem == entry.config)
        assert entry.task != "unknown", entry
    by_config = {e.config: e for e in index.entries}
    assert by_config[KITTI_PP].task == "3D Object Detection" and by_config[KITTI_PP].dataset == "KITTI"
    assert by_config[FCOS3D].family == "fcos3d"
    # A stale `Config:` path whose file carries the entry's Name is still found.
    assert by_config["cylinder3d_4xb4-3x_semantickitti"].path is not None
    assert "monoflex_dla34_pytorch_dlaneck_gn-all_2x4_6x_kitti-mono3d" in {e.config for e in index.not_shipped}
    # The baseline in free_anchor's metafile belongs to its config folder's family.
    assert by_config["pointpillars_hv_fpn_sbn-all_8xb4-2x_nus-3d"].family == "pointpillars"
    assert len(zoo.select(index, ["second"])) == 5
    assert [e.config for e in zoo.select(index, [], [KITTI_PP])] == [KITTI_PP]


def test_unknown_family_or_config_is_bad_input(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    assert main(["zoo", "--family", "pointpilars", "--output", str(tmp_path)]) == 2
    assert "not a model-zoo family" in caplog.text
    assert main(["zoo", "--config", "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3clas", "--output", str(tmp_path)]) == 2
    assert KITTI_PP in caplog.text


# ---- verdicts from logs (no subprocess) ---------------------------------------------------------------------------

ENTRY = zoo.ZooEntry("m", "fam", "3D Object Detection", "KITTI", "m", "fam", Path("m.py"))
HEAD = "[1/6] analyze: build m\n[1/6] analyze done in 1 s\n[2/6] wrap: x\n[2/6] wrap done in 0 s\n"


def test_onnx_translation_failure_keeps_the_pt2_verdict():
    text = HEAD + "[3/6] export: torch.export + ONNX\n  patch A.forward (used at x)\n" \
                  "autoexport: error: ONNX translation failed (ops: aten::foo): Boom\n  what to do: ...\n"
    row = zoo.classify(ENTRY, 3, text, None, ["iree"], 5.0)
    assert (row.verdict, row.pt2, row.onnx, row.ort_parity, row.iree_parity) == \
        ("export failed", "pass", "fail", "not reached", "not reached")
    assert row.reason.startswith("ONNX translation failed") and row.stage == "export" and row.patches == ["A.forward"]


def test_verdicts_come_from_the_events_file_whatever_the_log_says():
    """With an events file (what `autoexport --events` writes), the log's wording plays no part."""
    events = [{"event": "stage", "name": "analyze", "status": "start"},
              {"event": "stage", "name": "analyze", "status": "done", "seconds": 1.0},
              {"event": "stage", "name": "export", "status": "start"},
              {"event": "patch", "name": "A.forward"},
              {"event": "exit", "code": 3, "error": "ONNX translation failed (ops: aten::foo): Boom\n  what to do: x",
               "kind": "ExportFailedError"}]
    row = zoo.classify(ENTRY, 3, "log lines in any wording\n", None, ["iree"], 5.0, events=events)
    assert (row.verdict, row.pt2, row.onnx, row.ort_parity, row.iree_parity) == \
        ("export failed", "pass", "fail", "not reached", "not reached")
    assert row.reason == "ONNX translation failed (ops: aten::foo): Boom" and row.stage == "export"
    assert row.patches == ["A.forward"]
    parity = [*events[:2], {"event": "exit", "code": 1, "error": "parity failed:\n  onnxruntime out_x: 3 elements"}]
    row = zoo.classify(ENTRY, 1, "", None, [], 5.0, events=parity)
    assert row.verdict == "parity failed" and row.reason == "parity failed: onnxruntime out_x: 3 elements"
    # No exit event (killed, or a traceback outside the CLI's handler): a crash, in the stage it started last.
    row = zoo.classify(ENTRY, 1, "Traceback ...\nMemoryError: oops\n", None, [], 1.0, events=events[:3])
    assert row.verdict == "crash" and row.stage == "export"


def test_iree_compile_failure_and_timeout_and_crash():
    lower = HEAD + "[3/6] export: x\n[3/6] export done in 1 s\n[4/6] lower: iree\n" \
                   "autoexport: error: iree-compile failed (exit 1): error: stack allocation\n"
    row = zoo.classify(ENTRY, 3, lower, None, ["iree"], 5.0)
    assert (row.pt2, row.onnx, row.ort_parity, row.iree_parity) == ("pass", "pass", "not reached", "fail")
    assert zoo.shorten_paths("iree-compile failed: /out/.m.partial-12/iree/.iree-llvm-cpu.mlir:190:14: error: x",
                             Path("/out"), "m") == "iree-compile failed: iree/.iree-llvm-cpu.mlir:190:14: error: x"

    row = zoo.classify(ENTRY, -9, HEAD + "[3/6] export: x\n", None, [], 900.0, timeout_s=900)
    assert row.verdict == "timeout" and row.reason == "timed out after 900 s (in stage export)"
    assert (row.pt2, row.iree_parity) == ("fail", "-")

    # An uncaught exception exits 1 too, but without the CLI's error line it is no parity verdict.
    traceback = 'Traceback (most recent call last):\n  File "/x/analyze.py", line 232, in _run_pipeline\n    b[0]\n'
    row = zoo.classify(ENTRY, 1, HEAD + "[3/6] export: x\n" + traceback + "MemoryError: oops\n", None, [], 1.0)
    assert row.verdict == "crash" and row.stage == "export" and row.pt2 == "fail"
    assert row.reason == "crashed (exit 1): MemoryError: oops (at analyze.py:232 in _run_pipeline)"
    assert zoo.classify(ENTRY, -11, HEAD, None, [], 1.0).reason == "killed by SIGSEGV"


def test_parity_failure_reads_metadata_and_method():
    text = HEAD + "autoexport: error: parity failed:\n  onnxruntime out on sample_0: 5/10 elements outside\n"
    metadata = {"parity": {"summary": {"pt2": {"passed": True}, "onnxruntime": {"passed": False}},
                           "skipped": [{"runtime": "iree-cuda", "reason": "no GPU"}]},
                "export_patches": [{"target": "SparseConvolution", "method": "forward"},
                                   {"target": "VoxelNet", "method": "extract_feat"}],
                "substitutions": [{"op": "mmcv.ops.SparseConvolution",
                                   "by": "SparseConvolution.forward (autoexport.ops)"},
                                  {"op": "x", "kind": "custom op"}]}
    row = zoo.classify(ENTRY, 1, text, metadata, ["iree:cuda"], 3.0)
    assert (row.verdict, row.pt2, row.onnx, row.ort_parity, row.iree_parity) == \
        ("parity failed", "pass", "pass", "fail", "skipped")
    assert row.reason == "parity failed: onnxruntime out on sample_0: 5/10 elements outside"
    assert row.method == "patched + substituted op + custom op"
    assert zoo.export_method({"export_patches": []})[0] == "native"
    assert zoo.export_method({"export_patches": [{"target": "S", "method": "f"}],
                              "substitutions": [{"op": "o", "by": "S.f (autoexport.ops)"}]})[0] == "substituted op"



def test_a_failed_split_chain_fails_onnxruntime_parity():
    """A two-stage detector's one graph is its RPN; the split's chained ONNX Runtime check covers the model."""
    text = HEAD + "  chained onnxruntime stages vs eager model: max_abs 9.30e-05  FAIL\n" \
                  "autoexport: error: split export parity failed:\n  chained: sample_1: host step proposals " \
                  "differs from eager's (rois)\n  chained stages: max abs 9.3e-05\n"
    assert zoo.read_log(text).parity == {"onnxruntime": "fail"}
    metadata = {"parity": {"summary": {"pt2": {"passed": True}, "onnxruntime": {"passed": True}}},
                "split": {"manifest": "stages.json", "passed": False, "stages": ["rpn", "proposals", "roi"]}}
    row = zoo.classify(ENTRY, 1, text, metadata, [], 3.0)
    assert (row.verdict, row.pt2, row.onnx, row.ort_parity) == ("parity failed", "pass", "pass", "fail")
    assert row.method == "split"
    assert row.reason.startswith("split export parity failed: chained: sample_1: host step proposals")
    assert not zoo.meets_fp32_target(row)


def test_family_table_counts_verdicts_and_the_fp32_target():
    def row(config: str, family: str, verdict: str, ort: str) -> zoo.ZooResult:
        return zoo.ZooResult(config, family, "3D Object Detection", verdict, "pass", "pass", ort, "-", "patched",
                             0, 1.0, "")

    rows = [row("a1", "alpha", "pass", "pass"), row("a2", "alpha", "parity failed", "fail"),
            row("a3", "alpha", "timeout", "not reached"),
            # An IREE failure does not take the family off the target: ONNX Runtime passed.
            row("b1", "beta", "parity failed", "pass"), row("c1", "gamma", "parity failed", "fail")]
    lines = zoo.family_table(rows)
    assert lines[0] == "| family | task | configs | pass | parity failed | bad input | config not shipped | other " \
                       "| fp32 target |"
    assert lines[2:] == ["| alpha | 3D Object Detection | 3 | 1 | 1 | 0 | 0 | 1 | yes |",
                         "| beta | 3D Object Detection | 1 | 0 | 1 | 0 | 0 | 0 | yes |",
                         "| gamma | 3D Object Detection | 1 | 0 | 1 | 0 | 0 | 0 | no |"]
    markdown = zoo.markdown_table(rows)
    assert "2 of 3 families" in markdown and markdown.index("| alpha |") < markdown.index("| a1 |")


def test_every_export_gets_a_thread_count(monkeypatch: pytest.MonkeyPatch):
    def omp(threads: int | None, jobs: int) -> str:
        sweep = zoo.Sweep(zoo.ZooOptions(jobs=jobs, threads=threads), zoo.load_zoo(), 0)
        return sweep._env()["OMP_NUM_THREADS"]

    monkeypatch.setattr(zoo.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert (omp(None, 1), omp(None, 3), omp(None, 16), omp(5, 1)) == ("8", "2", "1", "5")
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the caller's choice stands, unless --threads overrides it
    assert (omp(None, 2), omp(1, 2)) == ("6", "1")


# ---- a real sweep ---------------------------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_records_verdicts_resumes_and_tabulates(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch):
    out, cov, table = tmp_path / "zoo", tmp_path / "coverage.json", tmp_path / "table.md"
    args = ["zoo", "--config", KITTI_PP, MINKUNET, "--output", str(out), "--coverage-json", str(cov),
            "--markdown", str(table), "--jobs", "2"]
    assert main(args) == 0

    rows = {r["config"]: r for r in _rows(out / zoo.RESULTS_FILE)}
    assert set(rows) == {KITTI_PP, MINKUNET}
    pp, mink = rows[KITTI_PP], rows[MINKUNET]
    assert (pp["verdict"], pp["pt2"], pp["onnx"], pp["ort_parity"], pp["iree_parity"], pp["exit_code"]) == \
        ("pass", "pass", "pass", "pass", "-", 0)
    assert pp["method"].startswith("patched") and "PointPillarsScatter.forward" in pp["patches"]
    assert pp["reason"] == "" and pp["family"] == "pointpillars" and pp["task"] == "3D Object Detection"
    assert pp["threads"] == mink["threads"] and pp["threads"] >= 1
    assert (mink["verdict"], mink["exit_code"], mink["pt2"], mink["onnx"], mink["ort_parity"]) == \
        ("bad input", 2, "not reached", "not reached", "not reached")
    assert "install Torchsparse" in mink["reason"] and "\n" not in mink["reason"]
    assert mink["stage"] == "analyze" and mink["method"] == "-"
    # Exports are deleted once recorded; the logs stay.
    assert not (out / KITTI_PP).exists() and not (out / MINKUNET).exists()
    assert (out / "logs" / f"{KITTI_PP}.log").is_file()
    assert "[2/2 done]" in caplog.text and f"zoo: start {KITTI_PP}" in caplog.text

    report = json.loads(cov.read_text())
    assert report["summary"]["by_verdict"] == {"pass": 1, "bad input": 1}
    assert report["summary"]["by_family"]["pointpillars"] == {"total": 1, "pass": 1}
    assert report["zoo"]["entries"] == 116 and "torch" in report["environment"] and len(report["rows"]) == 2
    markdown = table.read_text()
    assert "| config | family | PT2 | ONNX | ORT parity | IREE parity | method | reason |" in markdown
    assert f"| {KITTI_PP} | pointpillars | pass | pass | pass | - | patched" in markdown
    assert "| pointpillars | 3D Object Detection | 1 | 1 | 0 | 0 | 0 | 0 | yes |" in markdown
    assert "| minkunet | 3D Semantic Segmentation | 1 | 0 | 0 | 1 | 0 | 0 | no |" in markdown
    assert f"| {MINKUNET} | minkunet | not reached | not reached | not reached | - | - | the config's model" \
        in markdown

    # Resume: both are recorded, so nothing runs again.
    def no_export(self, entry):  # noqa: ANN001, ANN202
        raise AssertionError(f"{entry.config} was exported again")

    caplog.clear()
    with monkeypatch.context() as patched:
        patched.setattr(zoo.Sweep, "run_entry", no_export)
        assert main(args) == 0
    assert "2 of 2 already recorded" in caplog.text and len(_rows(out / zoo.RESULTS_FILE)) == 2
    assert f"| {KITTI_PP} |" in table.read_text() and f"| {MINKUNET} |" in table.read_text()

    # --no-resume runs it again (a second line); a timeout kills it and says so. The table keeps one row per config.
    assert main(["zoo", "--config", KITTI_PP, "--output", str(out), "--coverage-json", str(cov), "--markdown",
                 str(table), "--no-resume", "--timeout", "2"]) == 0
    lines = _rows(out / zoo.RESULTS_FILE)
    assert len(lines) == 3 and lines[-1]["config"] == KITTI_PP
    assert lines[-1]["verdict"] == "timeout" and lines[-1]["reason"].startswith("timed out after 2 s")
    assert not list(out.glob(f"*{KITTI_PP}*"))
    report = json.loads(cov.read_text())
    assert report["summary"]["by_verdict"] == {"timeout": 1, "bad input": 1}

    # A sweep of one config into a fresh output folder updates the coverage JSON: the other config keeps its row.
    caplog.clear()
    fresh = ["zoo", "--config", MINKUNET, "--output", str(tmp_path / "fresh"), "--coverage-json", str(cov),
             "--markdown", str(table)]
    assert main(fresh) == 0
    assert "1 configs not recorded" in caplog.text
    report = json.loads(cov.read_text())
    assert {r["config"]: r["verdict"] for r in report["rows"]} == {KITTI_PP: "timeout", MINKUNET: "bad input"}
    assert f"| {KITTI_PP} |" in table.read_text()
    # --replace-coverage writes only what this output folder recorded.
    assert main([*fresh, "--replace-coverage"]) == 0
    assert [r["config"] for r in json.loads(cov.read_text())["rows"]] == [MINKUNET]
    # A coverage file that is not one is refused (exit 2) rather than overwritten.
    cov.write_text("[1, 2]")
    assert main(fresh) == 2 and cov.read_text() == "[1, 2]"


# ---- shards and merge (no exports) --------------------------------------------------------------------------------

def test_shards_are_deterministic_disjoint_and_cover_the_selection(tmp_path: Path, capsys: pytest.CaptureFixture):
    entries = zoo.load_zoo().entries
    slices = [zoo.shard_of(entries, k, 4) for k in range(1, 5)]
    names = [e.config for part in slices for e in part]
    assert sorted(names) == sorted(e.config for e in entries) and len(set(names)) == 114
    assert [len(part) for part in slices] == [29, 29, 28, 28]
    assert zoo.shard_of(list(reversed(entries)), 2, 4) == slices[1]  # the order of the metafiles does not matter
    assert zoo.parse_shard("3/4") == (3, 4)
    for bad in ("0/4", "5/4", "x/4", "2"):
        assert main(["zoo", "--shard", bad, "--list"]) == 2
    assert main(["zoo", "--family", "second", "--shard", "2/2", "--list"]) == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert listed == [e.config for e in zoo.shard_of(zoo.select(zoo.load_zoo(), ["second"]), 2, 2)] and len(listed) == 2


def _row(config: str, verdict: str, finished: str) -> dict:
    return zoo.ZooResult(config, "fam", "3D Object Detection", verdict, "pass", "pass",
                         "pass" if verdict == "pass" else "fail", "-", "native", 0, 1.0, "",
                         finished=finished).to_json()


def test_merge_joins_shards_keeping_the_latest_row_per_config(tmp_path: Path):
    first = tmp_path / "shard1.json"
    first.write_text(json.dumps({"zoo": {"configs": 114}, "backends": [], "timeout_s": 900.0,
                                 "rows": [_row("a", "parity failed", "2026-01-01T00:00:00+00:00"),
                                          _row("b", "pass", "2026-01-01T00:00:00+00:00")]}))
    second = tmp_path / "zoo_results.jsonl"
    second.write_text(json.dumps(_row("a", "pass", "2026-01-02T00:00:00+00:00")) + "\n"
                      + json.dumps(_row("c", "bad input", "2026-01-02T00:00:00+00:00")) + "\n")
    out, table = tmp_path / "merged.json", tmp_path / "merged.md"
    assert main(["zoo", "merge", str(first), str(second), "--coverage-json", str(out), "--markdown", str(table)]) == 0
    merged = json.loads(out.read_text())
    assert [(r["config"], r["verdict"]) for r in merged["rows"]] == [("a", "pass"), ("b", "pass"), ("c", "bad input")]
    assert merged["summary"]["by_verdict"] == {"pass": 2, "bad input": 1} and merged["zoo"] == {"configs": 114}
    assert "3 configs: 2 pass, 1 bad input" in table.read_text()
    (tmp_path / "bad.json").write_text("[]")
    assert main(["zoo", "merge", str(tmp_path / "bad.json"), "--coverage-json", str(out)]) == 2
    assert main(["zoo", "merge", str(tmp_path / "missing.json"), "--coverage-json", str(out)]) == 2
