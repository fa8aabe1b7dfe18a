#!/usr/bin/env python3
"""Runs the dashboard's shard queries against a real Prometheus scraping a real shard.

Starts `omega-shard serve` (embedded store) on loopback ports, a Prometheus (Debian
`prometheus`) scraping it every second as job `omega-shard`, drives it with `omega-load`,
then runs every query of the dashboard's shard panels through Prometheus' HTTP API and fails
when one returns no data. The Federation and Operator rows are not covered here: their series
come from the operator (docs/operations.md, "Metrics"), which needs a Kubernetes API server;
their expressions are checked against the documented series by the operator's chart test.

Usage: dashboard_live.py TARGET_DIR   (where omega-shard and omega-load were built)
Prints "N passed, M failed".
"""
import json
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
NOT_HERE = {"Federation", "Operator"}


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


def shard_queries():
    dash = json.loads((CHART / "dashboards/omega.json").read_text())
    section, out = None, []
    for p in dash["panels"]:
        if p["type"] == "row":
            section = p["title"]
            continue
        if section in NOT_HERE:
            continue
        for t in p["targets"]:
            expr = t["expr"].replace("$namespace", ".*").replace("$shard", ".*")
            out.append((f'{p["title"]} / {t["legendFormat"]}', expr))
    return out


def main():
    target = pathlib.Path(sys.argv[1])
    prometheus = shutil.which("prometheus")
    if not prometheus:
        raise SystemExit("prometheus is not installed (Debian package prometheus)")
    grpc, admin, rest, metrics, prom = (free_port() for _ in range(5))
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
            time.sleep(3)  # two more scrapes after the load
            passed, failed = 0, []
            for name, expr in shard_queries():
                q = urllib.parse.urlencode({"query": expr})
                result = get(f"{api}/query?{q}")["data"]["result"]
                if result:
                    passed += 1
                    print(f"ok: {name}: {len(result)} series")
                else:
                    failed.append(name)
                    print(f"FAILED: {name}: no data for {expr}")
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
