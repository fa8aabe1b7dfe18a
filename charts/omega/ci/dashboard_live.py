#!/usr/bin/env python3
"""Runs every query of the dashboard against a real Prometheus scraping a real shard and a
real operator.

Starts `omega-shard serve` (embedded store) on loopback ports and a Prometheus (Debian
`prometheus`) scraping it every second as job `omega-shard`, drives the shard with
`omega-load`, then starts the operator's cluster test `live::fake_cluster_for_the_live_dashboard`
(operator/tests/cluster/live.rs): the real `omega-operator` binary against the fake Kubernetes
API server of the operator's tests, its shard pods' stats answered by the shard above and one
FederationRound whose Job runs a real `omega-shard federate` over it. Prometheus scrapes the
operator's `/metrics` as job `omega-operator` (the `federation_*` series come from there, as in
a cluster). Every query of every panel then goes through Prometheus' HTTP API and the script
fails when one returns no data. Both `/metrics` endpoints must also pass
`promtool check metrics` (the classic text format they serve to non-Prometheus clients).

Usage: dashboard_live.py TARGET_DIR   (where omega-shard and omega-load were built; cargo
builds the operator's test if it is not built yet)
Prints "N passed, M failed".
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

CHART = pathlib.Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_for(what, check, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def queries():
    dash = json.loads((CHART / "dashboards/omega.json").read_text())
    out = []
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        for t in p["targets"]:
            expr = t["expr"].replace("$namespace", ".*").replace("$shard", ".*")
            out.append((f'{p["title"]} / {t["legendFormat"]}', expr))
    return out


def main():
    target = pathlib.Path(sys.argv[1]).resolve()
    prometheus = shutil.which("prometheus")
    if not prometheus:
        raise SystemExit("prometheus is not installed (Debian package prometheus)")
    promtool = shutil.which("promtool")
    if not promtool:
        raise SystemExit("promtool is not installed (Debian package prometheus)")
    grpc, admin, rest, metrics, prom, operator = (free_port() for _ in range(6))
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        try:
            env = {
                "PATH": "/usr/bin:/bin",
                "DATA_DIR": str(tmp / "data"),
                "GRPC_ADDR": f"127.0.0.1:{grpc}",
                "ADMIN_GRPC_ADDR": f"127.0.0.1:{admin}",
                "REST_ADDR": f"127.0.0.1:{rest}",
                "METRICS_ADDR": f"127.0.0.1:{metrics}",
                "LOG_FORMAT": "json",
                "RUST_LOG": "warn",
            }
            procs.append(subprocess.Popen([str(target / "omega-shard"), "serve"], env=env))
            wait_for("the shard", lambda: get(f"http://127.0.0.1:{rest}/ready")["ready"])
            (tmp / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                "scrape_configs:\n"
                f"  - job_name: omega-shard\n    static_configs: [{{targets: ['127.0.0.1:{metrics}']}}]\n"
                f"  - job_name: omega-operator\n    static_configs: [{{targets: ['127.0.0.1:{operator}']}}]\n"
            )
            procs.append(
                subprocess.Popen(
                    [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                     f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom}",
                     "--log.level=warn"],
                    stdout=subprocess.DEVNULL,
                )
            )
            api = f"http://127.0.0.1:{prom}/api/v1"
            wait_for(
                "Prometheus to scrape the shard",
                lambda: any(t["health"] == "up" for t in get(f"{api}/targets")["data"]["activeTargets"]),
            )
            load = subprocess.run(
                [str(target / "omega-load"), "--target", f"http://127.0.0.1:{grpc}", "--devices", "300",
                 "--duration-secs", "15", "--json"],
                capture_output=True, text=True, timeout=300,
            )
            if load.returncode:
                raise SystemExit(f"omega-load failed: {load.stderr}")
            cluster_dir = tmp / "cluster"
            cluster_dir.mkdir()
            cluster = subprocess.Popen(
                ["cargo", "test", "--quiet", "--workspace", "--test", "cluster", "--",
                 "--ignored", "--exact", "live::fake_cluster_for_the_live_dashboard"],
                # --workspace: the features (and so the artifacts) of the workspace build that
                # scripts/test.sh made just before, so nothing is rebuilt.
                cwd=REPO,
                env={**os.environ,
                     "OMEGA_LIVE_DIR": str(cluster_dir),
                     "OMEGA_LIVE_SHARD_BIN": str(target / "omega-shard"),
                     "OMEGA_LIVE_SHARD_ADMIN": str(admin),
                     "OMEGA_LIVE_SHARD_REST": str(rest),
                     "OMEGA_LIVE_OPERATOR_PORT": str(operator)},
            )
            procs.append(cluster)
            # The first run may build the operator's test binary.
            wait_for("the fake cluster's round", lambda: cluster.poll() is not None
                     or (cluster_dir / "ready").exists(), seconds=900)
            if cluster.poll() is not None:
                raise SystemExit("the fake cluster test stopped early")
            wait_for(
                "Prometheus to scrape the operator",
                lambda: all(t["health"] == "up" for t in get(f"{api}/targets")["data"]["activeTargets"]),
            )
            time.sleep(3)  # two more scrapes of both
            passed, failed = 0, []
            for port in (metrics, operator):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    text = r.read()
                lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
                if lint.returncode:
                    failed.append(f"promtool check metrics :{port}")
                    print(f"FAILED: promtool check metrics on :{port}:\n{lint.stdout.decode()}{lint.stderr.decode()}")
                else:
                    passed += 1
                    print(f"ok: promtool check metrics on :{port}")
            for name, expr in queries():
                q = urllib.parse.urlencode({"query": expr})
                result = get(f"{api}/query?{q}")["data"]["result"]
                if result:
                    passed += 1
                    print(f"ok: {name}: {len(result)} series")
                else:
                    failed.append(name)
                    print(f"FAILED: {name}: no data for {expr}")
            (cluster_dir / "stop").write_text("")
            if cluster.wait(timeout=120):
                failed.append("the fake cluster test")
            print(f"{passed} passed, {len(failed)} failed")
            return 1 if failed else 0
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    sys.exit(main())
