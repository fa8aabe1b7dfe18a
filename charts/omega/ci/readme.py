#!/usr/bin/env python3
"""Generates the values table of charts/omega/README.md from the comments in values.yaml.

Usage: readme.py [--write | --check]
  (default) prints the table; --write replaces the block between the README's markers;
  --check exits 1 when the README is stale or a value has no comment.

The comment lines right above a key describe it. A commented key whose children carry no
comments (`resources`, `labels`) is one row with its whole default.
"""
import json
import pathlib
import re
import sys

import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?P<rest>.*)$")


def comments(text):
    """{dotted path: description} for every key with a comment block right above it."""
    out, stack, block = {}, [], []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            block = []
            continue
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        m = KEY.match(line)
        if not m:
            block = []
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        if block:
            out[".".join(k for _, k in stack)] = " ".join(block)
        block = []
    return out


def rows(values, described):
    """(path, default, description) rows; raises on a value nobody described."""
    result, missing = [], []

    def walk(node, path):
        has_described_child = any(p.startswith(path + ".") for p in described) if path else True
        if path in described and not has_described_child:
            result.append((path, node, described[path]))
            return
        if isinstance(node, dict) and node and has_described_child:
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
            return
        missing.append(path)

    walk(values, "")
    if missing:
        raise SystemExit(f"values without a comment in values.yaml: {missing}")
    return result


def table():
    text = (CHART / "values.yaml").read_text()
    lines = ["| Key | Default | Description |", "|---|---|---|"]
    for path, default, desc in rows(yaml.safe_load(text), comments(text)):
        shown = json.dumps(default, separators=(", ", ": "))
        desc = desc.replace("|", r"\|")
        lines.append(f"| `{path}` | `{shown}` | {desc} |")
    return "\n".join(lines) + "\n"


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if not mode:
        sys.stdout.write(table())
        return
    readme = CHART / "README.md"
    current = readme.read_text()
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    wanted = f"{head}{BEGIN}\n{table()}{END}{tail}"
    if mode == "--write":
        readme.write_text(wanted)
    elif mode == "--check":
        if wanted != current:
            raise SystemExit("charts/omega/README.md is stale: run charts/omega/ci/readme.py --write")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
