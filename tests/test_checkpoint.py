"""The checkpoint format in one process: write, commit, verify, select, reshard.

Several ranks are simulated with one ``Checkpointer`` per rank and no communicator:
background saves meet through the filesystem only, exactly as they do under MPI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hpcps.checkpoint import Checkpointer, open_checkpoint
from hpcps.checkpoint import files as F
from hpcps.config import load_config
from hpcps.errors import UserError
from hpcps.model.layout import ParamLayout
from hpcps.ps.roles import Roles

P = 1000
DESCRIBE = {"workload": "test", "n_params": P, "n_embd": 16, "vocab_size": 65,
            "tokenizer": "char", "tokenizer_sha256": "ab" * 32}


def make_layout(n: int = P) -> ParamLayout:
    layout = ParamLayout()
    layout.add("w", (n // 10, 10), std=0.02)
    return layout


def make_cfg(tmp_path, *extra):
    return load_config(None, [f"out_dir={tmp_path / 'run'}", "workload=synthetic",
                              f"synthetic.n_params={P}", *extra])


def single_roles() -> Roles:
    return Roles("single", 0, 1, [], [0], [0], 0, 1)


def ps_roles(rank: int, n_servers: int, n_workers: int) -> Roles:
    """World ranks: workers first, then servers (what build_roles does on one node)."""
    size = n_servers + n_workers
    workers = list(range(n_workers))
    servers = list(range(n_workers, size))
    return Roles("bsp", rank, size, servers, workers, [0] * size, rank, size)


def state_at(step: int, lo: int = 0, hi: int = P) -> dict:
    """A recognisable optimizer state: element i of step s holds s + i / 1000 (+1, +2)."""
    base = step + np.arange(lo, hi, dtype=np.float32) / 1000
    return {"params": base, "m": base + 1, "v": base + 2, "t": step, "version": step}


def worker_state(step: int, index: int = 0, residual: bool = False) -> dict:
    state = {"step": step, "pending_record": json.dumps({"step": step, "loss": 1.5}) if index == 0
             else ""}
    if residual:
        state["residual"] = np.full(P, index + 0.25, dtype=np.float32)
    return state


def reason(step: int, final: bool = False) -> dict:
    return {"step": step, "stop": False, "end": final, "checkpoint": True, "signal": ""}


def save_single(ckpt: Checkpointer, step: int, final: bool = False) -> None:
    ckpt.save(step, shard=(0, P, state_at(step)), worker=worker_state(step), reason=reason(step, final))


def single(tmp_path, *extra) -> Checkpointer:
    cfg = make_cfg(tmp_path, *extra)
    return Checkpointer(cfg, single_roles(), make_layout(), DESCRIBE)


def committed_steps(tmp_path) -> list[str]:
    return sorted(n for n in os.listdir(tmp_path / "run" / "checkpoints"))


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- write and read back ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("background", [True, False])
def test_roundtrip_single(tmp_path, background):
    ckpt = single(tmp_path, f"checkpoint.background={str(background).lower()}")
    assert ckpt.find_resume() is None
    save_single(ckpt, 7)
    ckpt.close()
    assert committed_steps(tmp_path) == ["step_00000007"]
    resume = single(tmp_path).find_resume()
    assert resume.step == 7 and resume.path.endswith("step_00000007")
    shard = resume.load_shard(0, P)
    expect = state_at(7)
    for name in ("params", "m", "v"):
        assert shard[name].dtype == np.float32
        np.testing.assert_array_equal(shard[name], expect[name])
    assert (shard["t"], shard["version"]) == (7, 7)
    worker = resume.load_worker(0, 1)
    assert worker["step"] == 7 and json.loads(worker["pending_record"]) == {"step": 7, "loss": 1.5}
    manifest = resume.manifest
    assert manifest["format"] == "hpcps-checkpoint" and manifest["format_version"] == 1
    assert manifest["describe"] == DESCRIBE and manifest["config"]["synthetic.n_params"] == P
    assert sorted(manifest["files"]) == ["server_0000.h5", "worker_0000.h5"]
    for name, entry in manifest["files"].items():
        assert entry["size"] == os.path.getsize(os.path.join(resume.path, name))
        assert entry["sha256"] == F.sha256_of(os.path.join(resume.path, name))
    assert not [n for n in os.listdir(resume.path) if n.startswith("rank_")]


def save_ranks(tmp_path, step: int, n_servers: int, n_workers: int, *, residual=False,
               extra=()) -> None:
    """One background save by S + W simulated ranks (rank 0 first: it makes the .tmp dir)."""
    from hpcps.ps.sharding import shard_ranges
    cfg = make_cfg(tmp_path, *extra)
    ranges = shard_ranges(P, n_servers)
    ckpts = []
    for rank in range(n_servers + n_workers):
        roles = ps_roles(rank, n_servers, n_workers)
        ckpt = Checkpointer(cfg, roles, make_layout(), DESCRIBE)
        ckpt.find_resume()
        shard = worker = None
        if roles.is_server:
            lo, hi = ranges[roles.server_index]
            shard = (lo, hi, state_at(step, lo, hi))
        else:
            worker = worker_state(step, roles.worker_index, residual)
        ckpt.save(step, shard=shard, worker=worker, reason=reason(step))
        ckpts.append(ckpt)
    for ckpt in ckpts:
        ckpt.close()


@pytest.mark.timeout(60)
def test_reshard_any_range(tmp_path):
    save_ranks(tmp_path, 5, n_servers=3, n_workers=2, residual=True)
    resume = single(tmp_path).find_resume()
    assert [(s["lo"], s["hi"]) for s in resume.manifest["shards"]] == [(0, 334), (334, 667),
                                                                        (667, 1000)]
    full = state_at(5)
    rng = np.random.default_rng(0)
    cuts = [(0, P), (0, 0), (333, 335), (999, 1000), (10, 900)]
    cuts += [tuple(sorted(rng.integers(0, P + 1, 2))) for _ in range(20)]
    for lo, hi in cuts:
        got = resume.load_shard(lo, hi)
        for name in ("params", "m", "v"):
            np.testing.assert_array_equal(got[name], full[name][lo:hi], err_msg=f"{name}[{lo}:{hi}]")
        assert got["t"] == 5
    # same W: each worker gets its own residual; another W: none, lead keeps the record
    same = [resume.load_worker(i, 2) for i in range(2)]
    assert [float(s["residual"][0]) for s in same] == [0.25, 1.25]
    assert same[1]["pending_record"] == ""
    other = [resume.load_worker(i, 3) for i in range(3)]
    assert all("residual" not in s for s in other)
    assert json.loads(other[0]["pending_record"])["step"] == 5
    assert other[1]["pending_record"] == other[2]["pending_record"] == ""


@pytest.mark.timeout(60)
def test_load_shard_notices_a_wrong_range(tmp_path):
    ckpt = single(tmp_path)
    save_single(ckpt, 1, final=True)
    resume = single(tmp_path).find_resume()
    with pytest.raises(ValueError):
        resume.load_shard(0, P + 1)


@pytest.mark.timeout(60)
def test_background_commit_waits_for_every_rank(tmp_path):
    """Rank 0's committer must not commit before the last rank dropped its file list."""
    cfg = make_cfg(tmp_path)
    roles = [ps_roles(r, 1, 1) for r in range(2)]
    worker = Checkpointer(cfg, roles[0], make_layout(), DESCRIBE)
    server = Checkpointer(cfg, roles[1], make_layout(), DESCRIBE)
    worker.save(3, shard=None, worker=worker_state(3), reason=reason(3))
    worker.job.thread.join(0.5)
    assert worker.job.thread.is_alive(), "committed without the server's shard"
    assert committed_steps(tmp_path) == ["step_00000003.tmp"]
    server.save(3, shard=(0, P, state_at(3)), worker=None, reason=reason(3))
    server.close()
    worker.close()
    assert committed_steps(tmp_path) == ["step_00000003"]


# -- commits, leftovers, retention -------------------------------------------------------------
@pytest.mark.timeout(60)
def test_keep_last_n_and_clean_leftovers(tmp_path):
    ckpt = single(tmp_path, "checkpoint.keep=2")
    leftover = tmp_path / "run" / "checkpoints" / "step_00000002.tmp"
    leftover.mkdir(parents=True)
    (leftover / "server_0000.h5").write_bytes(b"torn")
    assert ckpt.find_resume() is None  # a .tmp directory is never a checkpoint
    for step in (1, 2, 3, 4):
        save_single(ckpt, step)
        ckpt.close()
    assert committed_steps(tmp_path) == ["step_00000003", "step_00000004"]


@pytest.mark.timeout(60)
def test_resumed_checkpoint_survives_until_a_newer_commit(tmp_path):
    first = single(tmp_path, "checkpoint.keep=1")
    save_single(first, 10)
    first.close()
    second = single(tmp_path, "checkpoint.keep=1")
    assert second.find_resume().step == 10
    before = os.stat(tmp_path / "run/checkpoints/step_00000010/manifest.json").st_mtime_ns
    save_single(second, 10, final=True)  # the same sync point again: not re-saved
    assert os.stat(tmp_path / "run/checkpoints/step_00000010/manifest.json").st_mtime_ns == before
    assert committed_steps(tmp_path) == ["step_00000010"]
    save_single(second, 12)
    second.close()
    assert committed_steps(tmp_path) == ["step_00000012"]


@pytest.mark.timeout(60)
def test_newer_checkpoints_of_an_abandoned_timeline_are_dropped(tmp_path):
    ckpt = single(tmp_path)
    for step in (5, 10):
        save_single(ckpt, step)
        ckpt.close()
    old = tmp_path / "run/checkpoints/step_00000005"
    again = single(tmp_path, f"train.resume={old}")
    assert again.find_resume().step == 5
    save_single(again, 7)
    again.close()
    # step 10 came after step 5 in a run we went back from: auto must never pick it
    assert committed_steps(tmp_path) == ["step_00000005", "step_00000007"]


@pytest.mark.timeout(60)
def test_resume_never_refuses_to_mix_runs(tmp_path):
    ckpt = single(tmp_path)
    save_single(ckpt, 3, final=True)
    with pytest.raises(UserError, match="train.resume = never.*step_00000003"):
        single(tmp_path, "train.resume=never")
    assert committed_steps(tmp_path) == ["step_00000003"]


# -- damaged checkpoints -----------------------------------------------------------------------
def two_checkpoints(tmp_path) -> Path:
    ckpt = single(tmp_path)
    for step in (4, 8):
        save_single(ckpt, step)
        ckpt.close()
    return tmp_path / "run" / "checkpoints"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "no_manifest", "bad_json",
                                    "manifest_lacks_files"])
def test_damaged_newest_is_skipped_with_a_warning(tmp_path, capsys, damage):
    root = two_checkpoints(tmp_path)
    newest = root / "step_00000008"
    shard = newest / "server_0000.h5"
    manifest = newest / "manifest.json"
    if damage == "flip":
        flip_byte(shard)
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete":
        shard.unlink()
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "bad_json":
        manifest.write_text("{not json")
    else:
        data = json.loads(manifest.read_text())
        del data["files"]
        manifest.write_text(json.dumps(data))
    capsys.readouterr()
    resume = single(tmp_path).find_resume()
    assert resume.step == 4
    warning = capsys.readouterr().err
    named = "manifest.json" if damage in ("no_manifest", "bad_json", "manifest_lacks_files") \
        else "server_0000.h5"
    assert "warning" in warning and f"step_00000008/{named}" in warning, warning
    assert len(warning.strip().splitlines()) == 1
    # the same damage given as an explicit path is an error naming the file
    with pytest.raises(UserError, match=named):
        single(tmp_path, f"train.resume={newest}").find_resume()


@pytest.mark.timeout(60)
def test_intact_checkpoints_give_no_warning(tmp_path, capsys):
    # negative control for the test above
    two_checkpoints(tmp_path)
    capsys.readouterr()
    assert single(tmp_path).find_resume().step == 8
    assert capsys.readouterr().err == ""


@pytest.mark.timeout(60)
def test_warnings_only_on_rank_0(tmp_path, capsys):
    root = two_checkpoints(tmp_path)
    flip_byte(root / "step_00000008" / "worker_0000.h5")
    cfg = make_cfg(tmp_path)
    capsys.readouterr()
    picks = [Checkpointer(cfg, ps_roles(r, 1, 2), make_layout(), DESCRIBE).find_resume().step
             for r in range(3)]
    assert picks == [4, 4, 4]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.timeout(60)
def test_explicit_path_errors(tmp_path):
    root = two_checkpoints(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        single(tmp_path, f"train.resume={root / 'step_00000099'}").find_resume()
    with pytest.raises(UserError, match="checkpoint directory, not one checkpoint"):
        single(tmp_path, f"train.resume={root}").find_resume()
    assert single(tmp_path, f"train.resume={root / 'step_00000004'}").find_resume().step == 4


# -- does it fit this model? -------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_mismatch_lists_every_difference(tmp_path):
    two_checkpoints(tmp_path)
    other = dict(DESCRIBE, n_embd=32, vocab_size=70, tokenizer_sha256="cd" * 32)
    cfg = make_cfg(tmp_path)
    with pytest.raises(UserError) as err:
        Checkpointer(cfg, single_roles(), make_layout(), other).find_resume()
    text = str(err.value)
    assert "step_00000008 was written for n_embd=16, tokenizer_sha256=abababababab, " \
           "vocab_size=65; this run has n_embd=32, tokenizer_sha256=cdcdcdcdcdcd, vocab_size=70" \
           in text
    with pytest.raises(UserError, match="optimizer=adamw.*optimizer=sgd"):
        single(tmp_path, "train.optimizer=sgd").find_resume()


# -- write failures ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("background", [True, False])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, background):
    ckpt = single(tmp_path, f"checkpoint.background={str(background).lower()}")
    save_single(ckpt, 4)
    ckpt.close()
    monkeypatch.setenv(F.FAULT_ENV, "enospc:step=8:rank=0")
    with pytest.raises(UserError, match="step 8: cannot write .*server_0000.h5: No space left on "
                                        "device; the previous checkpoints are untouched"):
        save_single(ckpt, 8)
        ckpt.close()
    assert committed_steps(tmp_path) == ["step_00000004"]
    assert single(tmp_path).find_resume().step == 4


@pytest.mark.timeout(60)
def test_a_failing_rank_stops_the_background_commit(tmp_path, monkeypatch):
    monkeypatch.setenv(F.FAULT_ENV, "enospc:step=6:rank=1")
    with pytest.raises(UserError, match="No space left"):
        save_ranks(tmp_path, 6, n_servers=1, n_workers=1)
    assert not os.path.exists(tmp_path / "run/checkpoints/step_00000006")


@pytest.mark.timeout(60)
def test_unwritable_checkpoint_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"checkpoint.dir {blocker}/ckpt cannot be created"):
        single(tmp_path, f"checkpoint.dir={blocker}/ckpt")
    if os.geteuid() == 0:
        return  # root writes into read-only directories
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(UserError, match="cannot be created or written"):
        single(tmp_path, f"checkpoint.dir={ro}")


# -- the reader for other commands ---------------------------------------------------------------
@pytest.mark.timeout(60)
def test_open_checkpoint(tmp_path, make_corpus):
    corpus = make_corpus("hello world, a small text to tokenise. " * 50)
    ckpt = single(tmp_path, f"data.path={corpus}")
    for step in (2, 6):
        save_single(ckpt, step)
        ckpt.close()
    run = tmp_path / "run"
    for where in (run, run / "checkpoints", run / "checkpoints" / "step_00000006"):
        reader = open_checkpoint(str(where))
        assert reader.step == 6
    assert open_checkpoint(str(run / "checkpoints" / "step_00000002")).step == 2
    np.testing.assert_array_equal(reader.params(), state_at(6)["params"])
    assert reader.config.synthetic.n_params == P and reader.config.data.path == str(corpus)
    from hpcps.data.tokenizer import Tokenizer
    assert Tokenizer.from_json(reader.tokenizer_json()).decode([0, 1]) != ""
    with pytest.raises(UserError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no committed checkpoint"):
        open_checkpoint(str(tmp_path / "empty"))
