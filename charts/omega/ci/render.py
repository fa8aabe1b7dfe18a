#!/usr/bin/env python3
"""Lints and renders the chart with Helm's own Go SDK (PyPI `helm-python-sdk`, no helm binary).

Usage: render.py CHART_DIR [VALUES_JSON]   — prints one JSON object:
{"lint": {...}, "manifests": {"template path": "yaml", ...}}
Exit 3 when helm-python-sdk is not installed (the caller decides to skip).
"""
import json
import sys

try:
    import helm_python
except ImportError:
    print("helm-python-sdk is not installed (pip install helm-python-sdk==0.2.2)", file=sys.stderr)
    sys.exit(3)

chart_dir = sys.argv[1]
values = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
report = helm_python.lint(chart_dir, values, strict=True, namespace="omega-system")
chart = helm_python.Chart.load(chart_dir)
manifests = chart.render(values, name="omega", namespace="omega-system", is_install=True)
crds = {c.get("name", str(i)): c.get("data", "") for i, c in enumerate(chart.crds)}
print(json.dumps({"lint": report, "manifests": manifests, "crds": crds}))
