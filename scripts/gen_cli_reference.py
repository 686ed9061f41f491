"""Writes docs/reference/cli.md from the argparse parsers themselves, so the reference cannot drift from --help.

    python scripts/gen_cli_reference.py            # rewrite docs/reference/cli.md
    python scripts/gen_cli_reference.py --check    # exit 1 if it is out of date (tests/test_docs.py runs this)

The hand-written parts (checks made before any work, exit codes) live in docs/reference/cli_notes.md and are
appended after the generated tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoexport.cli import _export_parser, _predict_parser, _verify_parser  # noqa: E402
from autoexport.zoo import merge_parser, zoo_parser  # noqa: E402

TARGET = ROOT / "docs" / "reference" / "cli.md"
NOTES = ROOT / "docs" / "reference" / "cli_notes.md"

HEADER = """# Command-line reference

Generated from the argparse parsers by `scripts/gen_cli_reference.py`; do not edit by hand (notes that are not
part of `--help` come from `cli_notes.md`).

```text
autoexport [export] --config CONFIG [options]     export a model (also: python3 -m autoexport)
autoexport verify OUTPUT_DIR [options]            re-check an existing export
autoexport predict OUTPUT_DIR --points FILE       run a --scope detections export on a point cloud
autoexport zoo [options]                          sweep mmdet3d's model zoo
autoexport zoo merge FILE... [options]            join the coverage files of several sweeps
```
"""


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    name = max(action.option_strings, key=len)
    if action.nargs == 0:
        return f"`{name}`"
    metavar = action.metavar or (f"{{{','.join(map(str, action.choices))}}}" if action.choices else action.dest.upper())
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    more = f" [{metavar} ...]" if action.nargs in ("+", "*") else ""
    return f"`{name} {metavar}{more}`".replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:
        return "off" if action.default in (False, None) else ""
    if action.default in (None, [], ()):
        return "none"
    return f"`{action.default}`" if not isinstance(action.default, (list, tuple)) else ", ".join(map(str, action.default))


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
    return " ".join(text.split()).replace("|", "\\|")


def _table(actions: list[argparse.Action]) -> list[str]:
    rows = ["| flag | default | help |", "|---|---|---|"]
    for action in actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        rows.append(f"| {_flag(action)} | {_default(action)} | {_help(action)} |")
    return rows


def render_parser(title: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## `{title}`", "", " ".join((parser.description or "").split()), ""]
    for group in parser._action_groups:
        if not group._group_actions:
            continue
        if group.title not in ("options", "optional arguments", "positional arguments"):
            lines += [f"{group.title.capitalize()}: {' '.join((group.description or '').split())}", ""]
        lines += _table(group._group_actions) + [""]
    return "\n".join(lines)


def render() -> str:
    parts = [HEADER, render_parser("autoexport", _export_parser()), render_parser("autoexport verify", _verify_parser()),
             render_parser("autoexport predict", _predict_parser()),
             render_parser("autoexport zoo", zoo_parser()), render_parser("autoexport zoo merge", merge_parser())]
    if NOTES.exists():
        parts.append(NOTES.read_text())
    return "\n".join(part.rstrip() + "\n" for part in parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run python scripts/gen_cli_reference.py")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
