"""``hpcps prepare`` / ``hpcps inspect`` as a user runs them (subprocesses), and
the progress reporter."""

import io
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from mpi_util import assert_one_line_error

from hpcps.data.corpus import Corpus
from hpcps.data.progress import Progress, format_amount

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
SENTINEL = b"an older corpus that must survive\n"


def hpcps(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hpcps", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=110)


def decode_all(path) -> str:
    with Corpus.open(path, verify=True) as corpus:
        tok = corpus.tokenizer
        return tok.decode(corpus.split("train").load()) + tok.decode(corpus.split("val").load())


@pytest.fixture
def texts(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    files = {"one.txt": "Alpha line.\nnaïve — ∑ 🙂\n" * 20, "sub/two.txt": "Beta\n" * 30,
             "three.md": "Gamma gamma.\n" * 10}
    for name, body in files.items():
        (root / name).write_text(body, encoding="utf-8")
    return root, files


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_cli_round_trips(tmp_path, texts, kind):
    root, files = texts
    # single file
    out = tmp_path / f"single-{kind}.h5"
    proc = hpcps("prepare", root / "one.txt", "-o", out, "--tokenizer", kind)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: ")
    assert "Traceback" not in proc.stderr
    assert decode_all(out) == files["one.txt"]
    # several files in the given order (not sorted)
    out = tmp_path / f"several-{kind}.h5"
    assert hpcps("prepare", root / "three.md", root / "one.txt", "-o", out, "--tokenizer", kind,
                 "-q").returncode == 0
    assert decode_all(out) == files["three.md"] + files["one.txt"]
    # a directory (recursive, sorted by path) and a glob (sorted), quiet: no stderr at all
    out = tmp_path / f"dir-{kind}.h5"
    proc = hpcps("prepare", root, "-o", out, "--tokenizer", kind, "--quiet")
    assert proc.returncode == 0 and proc.stderr == ""
    assert decode_all(out) == files["one.txt"] + files["sub/two.txt"] + files["three.md"]
    out = tmp_path / f"glob-{kind}.h5"
    assert hpcps("prepare", f"{root}/**/*.txt", "-o", out, "--tokenizer", kind,
                 "-q").returncode == 0
    assert decode_all(out) == files["one.txt"] + files["sub/two.txt"]


def test_cli_default_corpus_and_inspect(tmp_path):
    from hpcps.data.default_corpus import default_corpus_files
    out = tmp_path / "stdlib.h5"
    proc = hpcps("prepare", "--default-corpus", "-o", out, "--tokenizer", "byte", "-q")
    assert proc.returncode == 0, proc.stderr
    with Corpus.open(out) as corpus:
        names = [d["name"] for d in corpus.documents()]
    assert names == ["stdlib/" + p.name for p in default_corpus_files()]

    proc = hpcps("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer  byte, vocab_size 256, token_dtype uint16" in proc.stdout
    assert "checksums  ok" in proc.stdout
    info = json.loads(hpcps("inspect", out, "--json").stdout)
    assert info["format_version"] == 1 and info["checksums"] == "ok"
    assert info["documents"]["count"] == len(names)
    total = info["splits"]["train"]["n_tokens"] + info["splits"]["val"]["n_tokens"]
    assert total == info["documents"]["bytes"]
    assert info["splits"]["val"]["n_tokens"] == total - int(total * 0.9)


def test_cli_bpe(tmp_path, texts):
    pytest.importorskip("tokenizers")
    root, files = texts
    out = tmp_path / "bpe.h5"
    proc = hpcps("prepare", root, "-o", out, "--tokenizer", "bpe", "--vocab-size", "300", "-q")
    assert proc.returncode == 0, proc.stderr
    assert decode_all(out) == files["one.txt"] + files["sub/two.txt"] + files["three.md"]
    assert json.loads(hpcps("inspect", out, "--json").stdout)["tokenizer"] == "bpe"


# -- bad input: exit 2, one line, no traceback, the existing output untouched ----------


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "ok.txt").write_text("some fine text\n" * 10)
    (tmp_path / "latin1.txt").write_bytes(b"good start\n" + "café au lait".encode("latin-1"))
    (tmp_path / "empty1.txt").write_text("")
    (tmp_path / "empty2.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "one.txt").write_text("x")
    return tmp_path


BAD_CASES = {
    "missing input": (["missing.txt"], ["input path not found: missing.txt"]),
    "empty directory": (["emptydir"], ["no input files found in: emptydir"]),
    "all files empty": (["empty1.txt", "empty2.txt"], ["all 2 input file(s) are empty"]),
    "glob without match": (["*.nope"], ["no files match '*.nope'"]),
    "not utf-8 (char)": (["ok.txt", "latin1.txt"],
                         ["latin1.txt is not valid UTF-8", "byte 0xe9 at byte offset 14"]),
    "not utf-8 (bpe)": (["latin1.txt", "--tokenizer", "bpe"],
                        ["latin1.txt is not valid UTF-8", "at byte offset 14"]),
    "vocab too large for uint32": (["ok.txt", "--tokenizer", "bpe", "--vocab-size", str(2**32 + 1)],
                                   ["does not fit uint32"]),
    "bpe vocab too small": (["ok.txt", "--tokenizer", "bpe", "--vocab-size", "100"],
                            ["at least 256"]),
    "val fraction 0": (["ok.txt", "--val-fraction", "0"], ["--val-fraction must be between"]),
    "val fraction 1": (["ok.txt", "--val-fraction", "1"], ["--val-fraction must be between"]),
    "val fraction negative": (["ok.txt", "--val-fraction=-0.5"], ["--val-fraction"]),
    "val fraction not a number": (["ok.txt", "--val-fraction", "abc"], ["not a number: 'abc'"]),
    "vocab size with char": (["ok.txt", "--vocab-size", "100"],
                             ["--vocab-size only applies to --tokenizer bpe"]),
    "vocab size with byte": (["ok.txt", "--tokenizer", "byte", "--vocab-size", "100"],
                             ["--vocab-size only applies to --tokenizer bpe"]),
    "train split empty": (["one.txt"], ["only 1 token(s)", "train split would be empty"]),
    "val split empty": (["ok.txt", "--val-fraction", "1e-17"], ["val split would be empty"]),
    "unknown tokenizer": (["ok.txt", "--tokenizer", "chars"], ["did you mean 'char'"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_and_keeps_the_output(bad_inputs, case):
    args, fragments = BAD_CASES[case]
    out = bad_inputs / "out.h5"
    out.write_bytes(SENTINEL)
    # --overwrite on purpose: even then a failing run must leave OUT as it was.
    proc = hpcps("prepare", *args, "-o", out, "--overwrite", cwd=bad_inputs)
    assert_one_line_error(proc, *fragments)
    assert out.read_bytes() == SENTINEL
    assert not list(bad_inputs.glob("*.tmp"))


def test_existing_output_without_overwrite_is_refused_before_any_work(bad_inputs):
    out = bad_inputs / "out.h5"
    out.write_bytes(SENTINEL)
    before = out.stat().st_mtime_ns
    # The input is missing too: the output check comes first.
    proc = hpcps("prepare", "missing.txt", "-o", out, cwd=bad_inputs)
    assert_one_line_error(proc, "out.h5 exists (use --overwrite to replace it)")
    assert out.read_bytes() == SENTINEL and out.stat().st_mtime_ns == before
    proc = hpcps("prepare", "ok.txt", "-o", "out.h5", "--overwrite", "-q", cwd=bad_inputs)
    assert proc.returncode == 0 and out.read_bytes() != SENTINEL    # control: it can replace


# -- inspect on damaged corpora ----------------------------------------------------------


@pytest.fixture
def corpus_file(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghijklmnopqrstuvwxyz\n" * 100)
    out = tmp_path / "c.h5"
    assert hpcps("prepare", tmp_path / "t.txt", "-o", out, "-q").returncode == 0
    return out


def test_inspect_catches_damage(corpus_file, tmp_path):
    assert hpcps("inspect", corpus_file).returncode == 0            # control
    flipped = tmp_path / "flipped.h5"
    flipped.write_bytes(corpus_file.read_bytes())
    with h5py.File(flipped, "r") as f:
        offset = f["val/tokens"].id.get_chunk_info(0).byte_offset
    with open(flipped, "r+b") as fh:
        fh.seek(offset + 10)
        fh.write(b"\xff\xff")
    assert_one_line_error(hpcps("inspect", flipped), "fails its checksums in /val/tokens")
    assert hpcps("inspect", flipped, "--no-verify").returncode == 0  # only verification sees it

    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(corpus_file.read_bytes()[: corpus_file.stat().st_size // 2])
    assert_one_line_error(hpcps("inspect", truncated), "truncated")

    with h5py.File(corpus_file, "r+") as f:
        f["val/tokens"][123] = 70
    assert_one_line_error(hpcps("inspect", corpus_file),
                          "token id 70 >= vocab_size 27 in /val/tokens at position 123")
    assert_one_line_error(hpcps("inspect", tmp_path / "t.txt"), "not a readable HDF5 file")
    assert_one_line_error(hpcps("inspect", tmp_path / "nope.h5"), "corpus file not found")


# -- progress ------------------------------------------------------------------------------


def test_progress_plain_lines_and_quiet():
    stream = io.StringIO()
    with Progress(1000, "encode", stream=stream, interval=0.0, tty=False) as progress:
        progress.update(250)
        progress.update(750)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("encode:  25.0% 250 B / 1000 B")
    assert "ETA" in lines[0] and "\r" not in stream.getvalue()
    assert lines[-1].startswith("encode: 1000 B in 00:00")
    quiet = io.StringIO()
    with Progress(1000, "encode", quiet=True, stream=quiet, interval=0.0) as progress:
        progress.update(1000)
    assert quiet.getvalue() == ""
    short = io.StringIO()           # shorter than the interval: a log gets no lines at all
    with Progress(1000, "encode", stream=short, interval=60.0, tty=False) as progress:
        progress.update(1000)
    assert short.getvalue() == ""


def test_progress_tty_redraws_and_errors_print_no_summary():
    stream = io.StringIO()
    with pytest.raises(ValueError):
        with Progress(2 * 2**20, "scan", stream=stream, interval=0.0, tty=True) as progress:
            progress.update(2**20)
            raise ValueError("boom")
    text = stream.getvalue()
    assert text.startswith("\rscan: [##########..........]  50.0% 1.0 MiB / 2.0 MiB")
    assert text.endswith("\n") and " in 00:" not in text
    assert format_amount(1536, "B") == "1.5 KiB" and format_amount(12345, "batch") == "12,345 batch"
