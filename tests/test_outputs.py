"""Every command that writes a file: an output that cannot be written is one line on stderr,
exit 2, within seconds, and nothing is left behind; a writable one is written whole."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mpi_util import REPO_ROOT, SHAKESPEARE_CHAR, mpi_env, train_args

pytestmark = pytest.mark.timeout(120)

UNWRITABLE = "/proc/hpcps-cannot-write"   # a folder that takes no new files


def hpcps(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcps", *map(str, args)], capture_output=True,
                          text=True, env=mpi_env("mpich"), cwd=str(REPO_ROOT), timeout=timeout)


@pytest.fixture(scope="module")
def small_run(shakespeare_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("outputs") / "run"
    done = hpcps(*train_args(SHAKESPEARE_CHAR, shakespeare_corpus, run, "model.n_layer=1",
                             "model.n_embd=32", "model.n_head=2", "model.block_size=16",
                             "train.max_steps=2", "train.eval_every=0", "train.eval_steps=1",
                             "train.peak_flops=1e9", "-q"))
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.parametrize("command", [
    ["prepare", "{text}", "-o", f"{UNWRITABLE}.h5"],
    ["export", "{run}", "--format", "npz", "-o", f"{UNWRITABLE}.npz"],
    ["export", "{run}", "--format", "hf-gpt2", "-o", UNWRITABLE],
    ["metrics", "{run}", "-o", f"{UNWRITABLE}.csv"],
    ["plot", "{run}", "-o", f"{UNWRITABLE}.png"],
], ids=["prepare", "export-npz", "export-hf", "metrics", "plot"])
def test_unwritable_output_is_one_line_exit_2(small_run, shakespeare_path, command):
    if command[0] == "plot":
        pytest.importorskip("matplotlib")
    args = [a.format(run=small_run, text=shakespeare_path) for a in command]
    result = hpcps(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcps: error:") and UNWRITABLE in lines[0], \
        result.stderr


def test_writable_output_is_written_whole(small_run, tmp_path):
    # the control: the same command with a writable path succeeds and leaves one file
    out = tmp_path / "metrics.csv"
    result = hpcps("metrics", small_run, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text().splitlines()[0].startswith("step")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
