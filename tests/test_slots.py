"""bsp with fewer receive slots than pushers (``ps.slots``, ``hpcps.ps.ring``).

- the ticket arithmetic: every push gets one turn in one slot, in order, also on resume;
- no push is lost or folded twice (exact integer sums of the synthetic workload, k = 1 and
  2, several shards, plain and bf16 pushes);
- bsp with k < W equals one process with the global batch (rel 1e-5, both MPIs, shared
  memory and the network path), and every k gives the same run bit for bit (the fold
  order is the tickets', not the arrival's);
- kill -9 and resume with k < W is bit-identical to the uninterrupted run;
- a server's peak memory does not grow with the workers at fixed k (negative control: k = W
  grows by the extra slots);
- k < W where turns cannot work (asp, ssp, backup workers): one line, exit 2 on every rank
  (tests/test_ps_errors.py).
"""

from __future__ import annotations

import json
import signal
import sys

import numpy as np
import pytest
from mpi_util import (
    EXACT_SGD as SGD_BASE,
    HPCPS,
    SHAKESPEARE_CHAR,
    Job,
    assert_same_run,
    check_ok,
    final_params,
    mismatches,
    mpi_env,
    read_metrics,
    require_implementation,
    run_command,
    run_mpi,
    run_ok,
    tiny_gpt_args,
    train_args,
)

from hpcps.ps.ring import SlotRing

pytestmark = pytest.mark.mpi

STEPS = 6
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.eval_every=0",
        "train.eval_steps=2", "train.peak_flops=1e9", "train.batch_size=2"]


def tiny(corpus, run, *extra) -> list[str]:
    return ["-q", *train_args(SHAKESPEARE_CHAR, corpus, run, *TINY, *extra)]


# -- the ticket arithmetic -----------------------------------------------------------------
@pytest.mark.parametrize("pushers,slots", [(1, 1), (3, 1), (3, 2), (5, 2), (5, 3), (4, 4)])
@pytest.mark.parametrize("version", [0, 1, 7])
def test_every_ticket_gets_one_turn_in_order(pushers, slots, version):
    """Replay the server's folds: each ticket finds its slot free for exactly it, after the
    ticket k before it was folded, from any starting version (a resumed server)."""
    ring = SlotRing(slots, pushers)
    words = ring.initial_words(version)
    for ticket in range(version * pushers, (version + 4) * pushers):
        slot = ring.slot(ticket)
        assert words[slot] == ring.free_word(ticket), (ticket, words.tolist())
        # the next ticket of this slot must wait until this one is folded
        assert ring.slot(ticket + slots) == slot
        assert words[slot] != ring.free_word(ticket + slots)
        words[slot] = ring.full_word(ticket)               # the pusher's push landed
        assert words[slot] != ring.free_word(ticket + slots)
        words[slot] = ring.free_word(ticket + slots)       # the server folded it
    assert ring.always_free == (slots == pushers)
    if ring.always_free:   # one slot per pusher: pusher p always lands in slot p
        assert all(ring.slot(ring.ticket(step, p)) == p
                   for step in range(5) for p in range(pushers))


def test_ticket_replay_negative_control():
    # a resumed server that started its words at version 0 would make the first turns wrong
    ring = SlotRing(2, 3)
    assert ring.initial_words(1).tolist() != ring.initial_words(0).tolist()
    assert ring.initial_words(1)[ring.slot(3)] == ring.free_word(3)


# -- no push lost or folded twice --------------------------------------------------------------
# SGD at lr 1 with integer gradients; 4 workers at batch 1 push (w + 1) * (1 + i % 5), whose
# mean 2.5 * (1 + i % 5) is exact in fp32: the final parameters are an exact sum
EXACT_SGD = [*SGD_BASE, "ps.mode=bsp"]


def expected_bsp_sum(steps: int, workers: int, n_params: int) -> float:
    pattern = sum(1 + i % 5 for i in range(n_params))
    return -steps * sum(w + 1 for w in range(workers)) / workers * pattern


@pytest.mark.timeout(120)
@pytest.mark.parametrize("servers,slots,compression", [(1, 1, "none"), (3, 2, "none"),
                                                       (2, 1, "bf16")])
def test_bsp_turns_lose_no_push(mpi_impl, tmp_path, servers, slots, compression):
    run, steps, n = tmp_path / "run", 300, 1001
    check_ok(run_mpi(servers + 4, ["-q", "train", *EXACT_SGD, f"ps.servers={servers}",
                                   f"ps.slots={slots}", f"ps.compression={compression}",
                                   f"train.max_steps={steps}", f"synthetic.n_params={n}",
                                   f"out_dir={run}"], mpi_impl, timeout=100))
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert records[-1]["val_param_sum"] == expected_bsp_sum(steps, 4, n)


def test_expected_bsp_sum_negative_control():
    assert expected_bsp_sum(300, 4, 1001) == -300 * 2.5 * 3001
    assert expected_bsp_sum(299, 4, 1001) != expected_bsp_sum(300, 4, 1001)
    assert expected_bsp_sum(300, 3, 1001) != expected_bsp_sum(300, 4, 1001)


# -- bsp with k < W equals one process ---------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(shakespeare_corpus, tmp_path_factory):
    cache = {}

    def get(global_batch: int) -> list[dict]:
        if global_batch not in cache:
            run = tmp_path_factory.mktemp("single")
            args = tiny(shakespeare_corpus, run, f"train.batch_size={global_batch}",
                        "ps.mode=single")
            check_ok(run_command([sys.executable, *HPCPS, *args], 60, mpi_env("mpich")))
            cache[global_batch] = read_metrics(run)
        return cache[global_batch]
    return get


@pytest.mark.timeout(120)
@pytest.mark.parametrize("servers,workers,slots", [(1, 3, 1), (2, 3, 2), (1, 5, 2)],
                         ids=["S1W3k1", "S2W3k2", "S1W5k2"])
def test_fewer_slots_equal_one_process(mpi_impl, tmp_path, shakespeare_corpus, one_process,
                                       servers, workers, slots):
    run = tmp_path / "run"
    check_ok(run_mpi(servers + workers, tiny(shakespeare_corpus, run, "ps.mode=bsp",
                                             f"ps.servers={servers}", f"ps.slots={slots}"),
                     mpi_impl, timeout=90))
    assert mismatches(read_metrics(run), one_process(2 * workers)) == []


@pytest.mark.timeout(200)
def test_fewer_slots_equal_one_process_over_the_network(net_impl, tmp_path, shakespeare_corpus,
                                                        one_process):
    run = tmp_path / "run"
    check_ok(run_mpi(5, tiny(shakespeare_corpus, run, "ps.mode=bsp", "ps.servers=2",
                             "ps.slots=1"), net_impl, timeout=170))
    assert mismatches(read_metrics(run), one_process(6)) == []


@pytest.mark.timeout(200)
def test_every_slot_count_gives_the_same_run_bit_for_bit(tmp_path, shakespeare_corpus):
    """The server folds pushes in ticket order, so k changes who waits, never the sums."""
    require_implementation("mpich")
    runs = {}
    for slots in (1, 2, 4):
        run = tmp_path / f"k{slots}"
        check_ok(run_mpi(6, tiny(shakespeare_corpus, run, "ps.mode=bsp", "ps.servers=2",
                                 f"ps.slots={slots}", "ps.straggler=2:3"), "mpich", timeout=90))
        runs[slots] = run
    for slots in (1, 2):
        assert_same_run(runs[slots], runs[4])
        np.testing.assert_array_equal(final_params(runs[slots]), final_params(runs[4]))


# -- kill -9 and resume --------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_kill_and_resume_with_fewer_slots_is_bit_identical(shakespeare_corpus, tmp_path):
    require_implementation("mpich")
    args = ["ps.mode=bsp", "ps.servers=1", "ps.slots=1"]
    ref = tmp_path / "ref" / "run"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, ref, *args)], ref, n=4, name="reference")
    run = tmp_path / "killed" / "run"
    job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, *args)], run, n=4, name="killed")
    job.wait_for_step(11)
    job.signal_rank(2, signal.SIGKILL)    # a worker: its turns never come
    assert job.wait(60) != 0, job.output()
    assert job.steps_written() < len(read_metrics(ref)), "nothing was tested"
    resumed = run_ok(tiny_gpt_args(shakespeare_corpus, run, *args), run, n=4, name="resumed")
    assert "resuming from" in resumed.stdout, resumed.output()
    assert_same_run(run, ref)
    np.testing.assert_array_equal(final_params(run), final_params(ref))


# -- server memory does not grow with the workers ----------------------------------------------
def server_peak_mib(tmp_path, name: str, workers: int, slots) -> float:
    """Measured peak RSS of the one server of a synthetic bsp job (8 M elements, 3 steps),
    from the run's memory.json."""
    run = tmp_path / name
    check_ok(run_mpi(workers + 1, ["-q", "train", "workload=synthetic",
                                   "synthetic.n_params=8000000", "ps.mode=bsp", "ps.servers=1",
                                   f"ps.slots={slots}", "train.max_steps=3",
                                   "train.eval_every=0", "checkpoint.every=0",
                                   f"out_dir={run}"], "mpich", timeout=120))
    memory = json.loads((run / "memory.json").read_text())["ranks"]
    server = [r for r in memory.values() if r["kind"] == "server"]
    assert len(server) == 1
    return server[0]["peak_bytes"] / 2**20


@pytest.mark.timeout(300)
def test_server_memory_does_not_grow_with_workers(tmp_path):
    require_implementation("mpich")
    two = server_peak_mib(tmp_path, "w2", 2, 2)
    four = server_peak_mib(tmp_path, "w4", 4, 2)
    assert four <= 1.05 * two, (two, four)
    # negative control: one slot per worker holds 2 more slots of 32 MB at 4 workers
    four_all = server_peak_mib(tmp_path, "w4all", 4, 4)
    assert four_all - four >= 0.8 * 2 * 32e6 / 2**20, (four, four_all)
