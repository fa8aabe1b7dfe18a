#!/usr/bin/env python3
"""The chart's checks beyond the operator's Rust tests (run by scripts/test.sh):

- `helm lint --strict` and rendering through Helm's own Go SDK (helm-python-sdk), for several
  value sets; every rendered object validated with `kubernetes-validate --strict` against the
  Kubernetes OpenAPI schemas (unknown fields refused);
- values.schema.json refuses unknown keys at every level, and lists exactly values.yaml's keys;
- README.md's values table is current;
- `promtool check rules` and `promtool test rules` on the alert rules.

Prints one line per check and "N passed, 0 failed" at the end; exits 1 on the first failure.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import helm_python
import kubernetes_validate
import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent
# Kinds from other projects' CRDs: no OpenAPI schema in kubernetes-validate. The
# PrometheusRule's body is the rules file that promtool checks below.
FOREIGN = {"ServiceMonitor", "PrometheusRule"}
K8S_VERSION = "1.30.0"
passed = 0


def ok(name):
    global passed
    passed += 1
    print(f"ok: {name}")


def fail(name, why):
    print(f"FAILED: {name}: {why}")
    print(f"{passed} passed, 1 failed")
    sys.exit(1)


def render(values):
    lint = helm_python.lint(str(CHART), values, strict=True, namespace="omega-system")
    if lint["errors"] or any(m["severity"] >= 2 for m in lint["messages"]):
        raise ValueError(f"helm lint: {lint}")
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values, name="omega", namespace="omega-system", is_install=True)
    return [
        d
        for path, text in out.items()
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if d
    ]


VALUE_SETS = {
    "defaults": {},
    "everything on": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "prometheusRule": {"enabled": True},
        "dashboards": {"enabled": True},
        "extraEnv": [{"name": "OTEL_SERVICE_NAME", "value": "omega-operator"}],
        "extraEnvFrom": [{"secretRef": {"name": "extra"}}],
        "extraVolumes": [{"name": "ca", "configMap": {"name": "ca"}}],
        "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca", "readOnly": True}],
        "fullnameOverride": "tv-omega",
        "watchNamespace": "tv",
    },
    "split rbac": {"rbac": {"namespaces": ["tv-a", "tv-b"]}},
    "minimal": {
        "crds": {"install": False},
        "podDisruptionBudget": {"enabled": False},
        "rbac": {"create": False},
        "serviceAccount": {"create": False},
        "leaderElection": {"enabled": False},
        "replicaCount": 1,
        "nameOverride": "tvrec",
    },
}


def check_rendering():
    for name, values in VALUE_SETS.items():
        try:
            docs = render(values)
        except Exception as e:  # noqa: BLE001 - any failure of Helm is this check's failure
            fail(f"render {name}", e)
        for d in docs:
            what = f"render {name}: {d['kind']}/{d['metadata']['name']}"
            if d["kind"] in FOREIGN:
                continue
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(what, f"{e.message} at {'.'.join(map(str, e.path))}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(what, f"no schema: {e}")
        kinds = sorted({d["kind"] for d in docs})
        ok(f"helm lint + render + kubernetes-validate --strict ({name}): {len(docs)} objects {kinds}")
        yield name, docs


def check_values(docs_by_set):
    by_kind = lambda docs, k: [d for d in docs if d["kind"] == k]  # noqa: E731
    crds = by_kind(docs_by_set["defaults"], "CustomResourceDefinition")
    keep = [c["metadata"].get("annotations", {}).get("helm.sh/resource-policy") for c in crds]
    if len(crds) != 2 or keep != ["keep", "keep"]:
        fail("CRDs rendered with resource-policy keep", keep)
    if by_kind(docs_by_set["minimal"], "CustomResourceDefinition"):
        fail("crds.install=false renders no CRD", "CRDs rendered")
    ok("CRDs are templates with helm.sh/resource-policy: keep; crds.install=false drops them")
    pdb = by_kind(docs_by_set["defaults"], "PodDisruptionBudget")
    if len(pdb) != 1 or pdb[0]["spec"]["maxUnavailable"] != 1:
        fail("operator PDB", pdb)
    ok("the operator has a PodDisruptionBudget")
    every = docs_by_set["everything on"]
    dep = by_kind(every, "Deployment")[0]
    if dep["metadata"]["name"] != "tv-omega-operator":
        fail("fullnameOverride", dep["metadata"]["name"])
    pod = dep["spec"]["template"]["spec"]
    env = {e["name"] for e in pod["containers"][0]["env"]}
    if "OTEL_SERVICE_NAME" not in env or pod["volumes"][0]["name"] != "ca":
        fail("extraEnv/extraVolumes", pod)
    if pod["containers"][0]["envFrom"] != [{"secretRef": {"name": "extra"}}]:
        fail("extraEnvFrom", pod["containers"][0])
    minimal = by_kind(docs_by_set["minimal"], "Deployment")[0]["metadata"]["name"]
    if minimal != "omega-tvrec-operator":
        fail("nameOverride", minimal)
    ok("fullnameOverride, nameOverride, extraEnv, extraEnvFrom, extraVolumes(+Mounts)")
    rule = by_kind(every, "PrometheusRule")[0]
    plain = yaml.safe_load((CHART / "files/alerts/omega.rules.yaml").read_text())
    if rule["spec"] != plain:
        fail("PrometheusRule carries the rules file", rule["spec"])
    sm = by_kind(every, "ServiceMonitor")[0]
    if sm["spec"]["jobLabel"] != "app.kubernetes.io/name":
        fail("ServiceMonitor job", sm["spec"])
    ok("the PrometheusRule is the plain rules file; the operator's job is omega-operator")


def check_schema():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    props = set(schema["properties"]) - {"global"}
    if props != set(values):
        fail("schema lists values.yaml's keys", props ^ set(values))
    for typo in [
        {"replicas": 3},
        {"serviceMonitr": {"enabled": True}},
        {"serviceMonitor": {"enable": True}},
        {"crds": {"kept": True}},
        {"podDisruptionBudget": {"maxUnavailable": 0}},
    ]:
        try:
            render(typo)
        except Exception as e:  # noqa: BLE001
            if "additional properties" not in str(e) and "minimum" not in str(e):
                fail(f"schema refuses {typo}", e)
            continue
        fail(f"schema refuses {typo}", "rendered")
    ok("values.schema.json refuses unknown keys and lists exactly values.yaml's keys")


def check_readme():
    r = subprocess.run([sys.executable, str(CHART / "ci/readme.py"), "--check"], capture_output=True, text=True)
    if r.returncode:
        fail("README values table", r.stderr.strip())
    ok("README.md's values table matches values.yaml")


def check_rules():
    promtool = shutil.which("promtool")
    if not promtool:
        fail("promtool", "not installed (Debian package prometheus)")
    for args in (["check", "rules", "files/alerts/omega.rules.yaml"], ["test", "rules", "ci/alerts.test.yaml"]):
        r = subprocess.run([promtool, *args], cwd=CHART, capture_output=True, text=True)
        if r.returncode:
            fail(f"promtool {' '.join(args)}", r.stdout + r.stderr)
        ok(f"promtool {' '.join(args)}")


def main():
    docs = dict(check_rendering())
    check_values(docs)
    check_schema()
    check_readme()
    check_rules()
    print(f"{passed} passed, 0 failed")


if __name__ == "__main__":
    main()
