"""CPU-only machines never need CuPy: importing every hpcps module and a short
single-process training run (GPT and the allreduce-free path) must not even try
to import it. A fresh interpreter blocks ``cupy`` with an import hook that
records every attempt, then reports the attempts and ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from mpi_util import REPO_ROOT, mpi_env

pytestmark = pytest.mark.timeout(120)

PROBE = textwrap.dedent("""\
    import importlib, importlib.abc, json, pkgutil, sys

    attempts = []

    class BlockCupy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "cupy" or name.startswith(("cupy.", "cupyx", "cupy_backends")):
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockCupy())
    import hpcps
    failed = {}
    for mod in pkgutil.walk_packages(hpcps.__path__, "hpcps."):
        if mod.name == "hpcps.__main__":   # runs the CLI on import
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError as err:   # optional extras (torch, tokenizers...) may be missing
            failed[mod.name] = str(err)
    from hpcps.cli import main
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "attempts": attempts, "failed": failed,
                      "loaded": sorted(m for m in sys.modules if m.split(".")[0].startswith("cupy"))}))
    """)


def test_import_and_train_without_cupy(tmp_path, make_corpus):
    corpus = make_corpus("to be or not to be, that is the question. " * 200)
    args = ["-q", "train", f"data.path={corpus}", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=16", "model.block_size=16", "train.batch_size=2", "train.max_steps=3",
            "train.eval_every=0", "train.eval_steps=1", "train.peak_flops=1e9",
            f"out_dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                            timeout=100, cwd=str(REPO_ROOT), env=mpi_env("mpich"))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert report["attempts"] == [], report
    assert report["loaded"] == []
    assert not any("cupy" in err for err in report["failed"].values()), report["failed"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"step"') == 3


def test_the_probe_would_see_a_cupy_import(tmp_path):
    """Negative control: the hook records an import of cupy by hpcps code."""
    code = PROBE.replace("from hpcps.cli import main\ncode = main(sys.argv[1:])",
                         "from hpcps.backend import cupy_available\ncode = int(cupy_available())")
    assert code != PROBE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=100, cwd=str(REPO_ROOT), env=mpi_env("mpich"))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attempts"] == ["cupy"]
    assert report["code"] == 0
