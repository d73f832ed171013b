"""Run logs (metrics.jsonl), ``hpcps plot`` and ``hpcps metrics`` CSV export."""

import csv
import io
import json
import math
import sys

import pytest

from hpcps.cli import main
from hpcps.errors import UserError
from hpcps.metrics.runlog import read_metrics, run_label, write_metrics_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(path, mode, steps=120, staleness=False, val_every=20, extra_lines=()):
    """A synthetic run directory as the trainer writes it."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'out_dir = "{path.name}"\n\n[ps]\nmode = "{mode}"\n')
    lines = []
    for step in range(1, steps + 1):
        loss = 1.5 + 9.0 * math.exp(-step / 15) + 0.05 * math.sin(step)
        record = {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.9,
                  "tokens_per_s": 20000.0 + 100 * (step % 7), "wall_s": 0.25 * step}
        if staleness:
            record.update(staleness_mean=0.5, staleness_max=2, staleness_counts=[3, 2, 1],
                          push_mb=1.2, pull_mb=3.4)
        if step % val_every == 0:
            record.update(val_loss=loss + 0.1, val_ppl=math.exp(loss + 0.1))
        lines.append(json.dumps(record))
    (path / "metrics.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


# -- run logs --------------------------------------------------------------------------


def test_resume_duplicates_keep_the_last_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.9},
            {"step": 2, "loss": 4.1, "resumed": True}, {"step": 3, "loss": 3.7}, {"step": 4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1] == {"step": 2, "loss": 4.1, "resumed": True}
    assert records[2]["loss"] == 3.7


def test_torn_last_line_is_skipped_with_a_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    messages = []
    records = read_metrics(run, warn=messages.append)
    assert records == [{"step": 1, "loss": 2.0}]
    assert len(messages) == 1 and "line 2: skipped a torn last line" in messages[0]
    with pytest.warns(RuntimeWarning, match="torn last line"):
        read_metrics(run)


def test_malformed_middle_line_names_its_number(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,,}\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2: not valid JSON"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"loss": 2.0}\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"line 2: record needs an integer 'step'"):
        read_metrics(run)


def test_missing_run_dir_and_missing_metrics(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_metrics(tmp_path / "nope")
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        read_metrics(tmp_path)


def test_default_label_is_name_and_mode(tmp_path):
    assert run_label(make_run(tmp_path / "bsp-4w", "bsp")) == "bsp-4w (bsp)"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert run_label(bare) == "bare"  # no config.toml: just the name


# -- CSV export ------------------------------------------------------------------------


def test_csv_has_union_of_columns_step_first_and_json_lists():
    records = [{"loss": 2.0, "step": 1}, {"step": 2, "loss": 1.5, "staleness_counts": [3, 4]}]
    buffer = io.StringIO()
    columns = write_metrics_csv(records, buffer)
    assert columns == ["step", "loss", "staleness_counts"]
    rows = list(csv.reader(io.StringIO(buffer.getvalue())))
    assert rows == [columns, ["1", "2.0", ""], ["2", "1.5", "[3,4]"]]


def test_metrics_cli_writes_deduplicated_csv(tmp_path, capsys):
    run = make_run(tmp_path / "run", "asp", steps=5, staleness=True, val_every=2,
                   extra_lines=[json.dumps({"step": 5, "loss": 0.5})])
    out = tmp_path / "m.csv"
    assert main(["metrics", str(run), "-o", str(out)]) == 0
    assert capsys.readouterr().err == f"wrote {out}: 5 steps, 13 columns\n"
    rows = list(csv.DictReader(out.open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[4]["loss"] == "0.5" and rows[4]["val_loss"] == ""  # the resumed record won
    assert rows[0]["staleness_counts"] == "[3,2,1]"
    assert main(["metrics", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.endswith("does not exist\n") and err.count("\n") == 1


# -- plots -----------------------------------------------------------------------------


@pytest.fixture
def two_runs(tmp_path):
    single = make_run(tmp_path / "run-single", "single")
    asp = make_run(tmp_path / "run-asp", "asp", staleness=True)
    return single, asp


@pytest.mark.timeout(120)
def test_plot_two_runs_writes_a_png(tmp_path, two_runs):
    pytest.importorskip("matplotlib")
    from hpcps.metrics.plot import plot_runs

    out = tmp_path / "curves.png"
    # per run: train + val loss in two panels and tokens/s = 5; the asp run adds staleness
    assert plot_runs(two_runs, out) == 11
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 30_000

    assert plot_runs(two_runs[:1], tmp_path / "one.png") == 5  # no staleness anywhere
    bare = tmp_path / "loss-only"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')
    assert plot_runs([bare], tmp_path / "bare.png") == 1


@pytest.mark.timeout(120)
def test_plot_cli_labels_and_errors(tmp_path, two_runs, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp.png"
    argv = ["plot", "-o", str(out), *map(str, two_runs)]
    assert main([*argv, "--labels", "one,two"]) == 0
    assert capsys.readouterr().out == f"wrote {out}: 11 series from 2 runs\n"
    assert out.read_bytes()[:8] == PNG_MAGIC

    for extra, message in ((["--labels", "only-one"], "--labels has 1 names for 2 run directories"),
                           ([str(tmp_path / "nope")], "nope does not exist"),
                           ([str(tmp_path)], "has no metrics.jsonl")):
        assert main([*argv[:3], *extra, *argv[3:]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["plot", str(two_runs[0]), "-o", str(tmp_path / "x.bmpx")]) == 2
    assert "cannot write 'x.bmpx'" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_user_error(tmp_path, two_runs, monkeypatch):
    from hpcps.metrics.plot import plot_runs

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(UserError, match=r"plot needs matplotlib \(pip install 'hpcps\[plot\]'\)"):
        plot_runs(two_runs, tmp_path / "x.png")


def test_wall_clock_restart_after_resume_keeps_time_increasing(tmp_path):
    from hpcps.metrics.plot import load_curves

    run = tmp_path / "resumed"
    run.mkdir()
    walls = [(1, 1.0), (2, 2.0), (3, 3.0), (3, 0.5), (4, 1.5)]  # the restart re-ran step 3
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0, "wall_s": w}) + "\n" for s, w in walls))
    curves = load_curves(run)
    assert curves.loss_wall[0] == [1.0, 2.0, 2.0, 3.0]
