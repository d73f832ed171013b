"""The step-time model of docs/scaling.md (``hpcps.bench.cost_model``): fitting step times the
model itself produced gives back its parameters, a fixed optimizer cost is kept as given,
and the hierarchy term counts a node's workers."""

from __future__ import annotations

import math

import pytest

from hpcps.bench.cost_model import Layout, Machine, fit, predict_step_s

TRUE = Machine(overhead=2e-3, update=2e-9, decode=1e-10,
               per_byte={"net": 5e-10, "shm": 2e-10}, atomic={"net": 3e-4, "shm": 1e-5},
               wait={"net": 7e-4, "shm": 3e-4}, serve={"net": 6e-5, "shm": 4e-6})


def grid() -> list[Layout]:
    return [Layout(workers=w, servers=s, nodes=1, elements=p, compute_s=0.02, path=path, cores=2)
            for path in ("shm", "net") for w, s in ((2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 2))
            for p in (250_000, 1_000_000)]


def test_fit_recovers_the_parameters_that_made_the_times():
    layouts = grid()
    times = [predict_step_s(x, TRUE) for x in layouts]
    got = fit(layouts, times)
    for x, t in zip(layouts, times):
        assert predict_step_s(x, got) == pytest.approx(t, rel=1e-6)
    assert got.update == pytest.approx(TRUE.update, rel=1e-4)
    assert got.atomic["net"] == pytest.approx(TRUE.atomic["net"], rel=1e-4)


def test_a_measured_update_cost_is_kept_as_given():
    layouts = grid()
    times = [predict_step_s(x, TRUE) for x in layouts]
    got = fit(layouts, times, update=TRUE.update)
    assert got.update == TRUE.update
    # decode and per_byte both scale with Q x n: only their sum per path is determined
    for path in ("shm", "net"):
        assert got.decode + 8 * got.per_byte[path] == pytest.approx(
            TRUE.decode + 8 * TRUE.per_byte[path], rel=1e-6)


def test_fit_negative_control():
    """Times from other parameters give other parameters (the fit reads the data)."""
    layouts = grid()
    slower = Machine(**{**TRUE.as_dict(), "per_byte": {"net": 2e-9, "shm": 2e-10}})
    got = fit(layouts, [predict_step_s(x, slower) for x in layouts])
    assert not math.isclose(got.decode + 8 * got.per_byte["net"],
                            TRUE.decode + 8 * TRUE.per_byte["net"], rel_tol=0.1)


def test_the_hierarchy_moves_one_push_per_node_and_adds_the_node_reduce():
    m = Machine(**{**TRUE.as_dict(), "node_byte": 1e-10})
    flat = Layout(workers=8, servers=2, nodes=2, elements=1_000_000, compute_s=0.0, path="net",
                  cores=8)
    tree = Layout(**{**flat.__dict__, "hierarchy": True})
    assert (flat.pushers, tree.pushers) == (8, 2)
    n = 1_000_000 / 2
    saved = (8 - 2) * n * (m.decode + 2 * 4 * m.per_byte["net"])
    node_reduce = (8 / 2) * 1_000_000 * 4 * m.node_byte
    assert predict_step_s(tree, m) == pytest.approx(predict_step_s(flat, m) - saved + node_reduce)
