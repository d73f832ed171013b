"""Corpus format v1 through the Python API: prepare -> Corpus round trips,
nanoGPT compatibility, the streaming helpers, and damaged files."""

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hpcps.data.corpus as corpus_mod
import hpcps.data.encode as encode_mod
import hpcps.data.inputs as inputs_mod
from hpcps.data.corpus import Corpus
from hpcps.data.prepare import Source, prepare, resolve_inputs, split_point, utf8_blocks
from hpcps.errors import UserError

pytestmark = pytest.mark.timeout(60)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"

DOCS = {
    "a.txt": "First line.\nSecond line, naïve café.\n",
    "b.txt": "",                                     # empty documents are kept
    "c.txt": "Emoji 🙂 and ∑ math.\n" * 3,
    "d.txt": "tail text without newline",
}


def write_docs(root: Path, docs=DOCS) -> list:
    paths = []
    for name, text in docs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(str(path))
    return paths


def decode_all(path) -> str:
    with Corpus.open(path, verify=True) as corpus:
        tok = corpus.tokenizer
        return tok.decode(corpus.split("train").load()) + tok.decode(corpus.split("val").load())


def all_tokens(path) -> np.ndarray:
    with Corpus.open(path) as corpus:
        return np.concatenate([corpus.split("train").load(), corpus.split("val").load()])


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny chunks and blocks so small texts cross every boundary."""
    monkeypatch.setattr(corpus_mod, "CHUNK_TOKENS", 7)
    monkeypatch.setattr(inputs_mod, "BLOCK_BYTES", 5)


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_round_trip_several_files_with_tiny_chunks(tmp_path, small_chunks, kind):
    paths = write_docs(tmp_path / "in")
    out = str(tmp_path / "c.h5")
    result = prepare(paths, out, tokenizer=kind, quiet=True)
    text = "".join(DOCS.values())
    assert decode_all(out) == text
    n = len(text) if kind == "char" else len(text.encode("utf-8"))
    assert (result.n_train, result.n_val) == (int(n * 0.9), n - int(n * 0.9))
    with Corpus.open(out) as corpus:
        assert corpus.vocab_size == (len(set(text)) if kind == "char" else 256)
        assert corpus.token_dtype == np.dtype("uint16")
        assert corpus.kind == "lm" and corpus.tokenizer_kind == kind
        assert corpus.attrs["format"] == "hpcps-corpus" and corpus.attrs["format_version"] == 1
        assert corpus.attrs["split_token"] == result.n_train
        train = corpus.split("train")
        assert train.attrs["n_tokens"] == result.n_train == len(train)
        raw = train.load().astype("<u2").tobytes()
        assert train.attrs["sha256"] == hashlib.sha256(raw).hexdigest()
        assert train.read(3, 10).tolist() == train.load()[3:10].tolist()
        docs = corpus.documents()
    assert [d["name"] for d in docs] == paths
    for doc, (name, body) in zip(docs, DOCS.items()):
        raw = body.encode("utf-8")
        assert doc["sha256"] == hashlib.sha256(raw).hexdigest()
        assert doc["n_bytes"] == len(raw)
        assert doc["token_end"] - doc["token_start"] == (len(body) if kind == "char" else len(raw))
    assert docs[0]["token_start"] == 0 and docs[-1]["token_end"] == n
    assert docs[1]["token_start"] == docs[1]["token_end"]            # the empty file
    assert docs[0]["split"] == "train" and docs[-1]["split"] in ("val", "train+val")


def test_byte_tokenizer_keeps_arbitrary_bytes(tmp_path):
    raw = bytes(range(256)) * 3 + b"\xff\xfe end"
    (tmp_path / "bin.dat").write_bytes(raw)
    out = str(tmp_path / "b.h5")
    prepare([str(tmp_path / "bin.dat")], out, tokenizer="byte", quiet=True)
    assert all_tokens(out).tobytes() == np.frombuffer(raw, np.uint8).astype("<u2").tobytes()


def test_val_fraction_generalizes_the_split(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 1000)
    out = str(tmp_path / "c.h5")
    result = prepare([str(tmp_path / "t.txt")], out, val_fraction=0.25, quiet=True)
    assert (result.n_train, result.n_val) == (750, 250)
    assert split_point(1115394, 0.1) == 1003854
    with pytest.raises(UserError, match="train split would be empty"):
        split_point(1, 0.1)
    with pytest.raises(UserError, match="val split would be empty"):
        split_point(10, 1e-17)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tinyshakespeare.txt not available")
def test_char_matches_nanogpt_shakespeare_char(tmp_path):
    out = str(tmp_path / "shakespeare.h5")
    prepare([str(SHAKESPEARE)], out, tokenizer="char", quiet=True)
    data = SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(data))                          # nanoGPT's prepare, verbatim logic
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(data)
    with Corpus.open(out, verify=True) as corpus:
        assert corpus.vocab_size == 65 == len(chars)
        assert corpus.tokenizer.vocab == "".join(chars)
        train, val = corpus.split("train"), corpus.split("val")
        assert (train.n_tokens, val.n_tokens) == (1003854, 111540)
        assert train.read(0, 13).tolist() == [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52]
        assert train.read(0, 13).tolist() == [stoi[c] for c in data[:13]]
        assert val.read(0, 20).tolist() == [stoi[c] for c in data[int(n * 0.9):int(n * 0.9) + 20]]
        assert val.read(val.n_tokens - 5, val.n_tokens).tolist() == [stoi[c] for c in data[-5:]]


def test_bpe_prepare_round_trip_and_whole_document_ids(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    # Small pieces force many cuts; the ids must still equal whole-document encoding.
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 64)
    monkeypatch.setattr(inputs_mod, "BLOCK_BYTES", 100)
    docs = {"x.txt": "def f(x):\n    return  x  +  1\n\n\nclass A:\n    pass\n" * 30,
            "y.txt": "word " * 200 + "\n" + "z" * 300 + "\n  indented\n"}
    paths = write_docs(tmp_path, docs)
    out = str(tmp_path / "bpe.h5")
    prepare(paths, out, tokenizer="bpe", vocab_size=300, quiet=True)
    assert decode_all(out) == "".join(docs.values())
    ids = all_tokens(out)
    with Corpus.open(out) as corpus:
        tok = corpus.tokenizer
        assert corpus.vocab_size == tok.vocab_size <= 300
        rows = corpus.documents()
    for row, body in zip(rows, docs.values()):
        got = ids[row["token_start"]:row["token_end"]].tolist()
        if body == docs["y.txt"]:   # holds a 300-char run with no safe cut: forced cuts differ
            assert tok.decode(got) == body
        else:
            assert got == tok.encode(body).tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_bpe_cut_points_matter_negative_control():
    """Cutting inside a whitespace run changes the ids; the safe cut does not."""
    pytest.importorskip("tokenizers")
    from hpcps.data.tokenizer import BPETokenizer
    text = "alpha beta\n    gamma delta\n" * 10
    tok = BPETokenizer.train(iter([text]), vocab_size=280)
    whole = tok.encode(text).tolist()
    bad = text.index("\n    ") + 2                       # inside "\n    "
    assert tok.encode_many([text[:bad], text[bad:]]).tolist() != whole
    cut = encode_mod._safe_cut(text, 0, 40)
    assert text[cut] == "\n" and not text[cut - 1].isspace()
    assert tok.encode_many([text[:cut], text[cut:]]).tolist() == whole


def test_inputs_directory_glob_and_order(tmp_path):
    root = tmp_path / "corpus"
    write_docs(root, {"b/2.txt": "two", "a.txt": "one", "b/1.txt": "three", ".hidden": "no",
                      ".git/config": "no", "z.md": "four"})
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    sources, skipped = resolve_inputs([str(root)])
    assert [Path(s.path).relative_to(root).as_posix() for s in sources] == \
        ["a.txt", "b/1.txt", "b/2.txt", "z.md"]
    assert skipped == [str(root / "blob.bin")]
    sources, _ = resolve_inputs([str(root / "**" / "*.txt"), str(root / "z.md")])
    assert [Path(s.path).name for s in sources] == ["a.txt", "1.txt", "2.txt", "z.md"]
    with pytest.raises(UserError, match="no files match"):
        resolve_inputs([str(root / "*.nothing")])
    with pytest.raises(UserError, match="input path not found"):
        resolve_inputs([str(root / "missing.txt")])


def test_default_corpus_is_stdlib_modules():
    from hpcps.data.default_corpus import default_corpus_files, default_corpus_root
    files = default_corpus_files()
    assert files == sorted(files, key=lambda p: p.name)
    assert all(p.parent == default_corpus_root() and p.suffix == ".py" for p in files)
    assert any(p.name == "os.py" for p in files)
    assert 1_000_000 < sum(p.stat().st_size for p in files) < 20_000_000
    sources, _ = resolve_inputs(["default"])
    assert [s.name for s in sources] == ["stdlib/" + p.name for p in files]


def check_blocks(data: bytes, block: int) -> str:
    src_path = Path(check_blocks.tmp) / "blk.txt"
    src_path.write_bytes(data)
    src = Source(str(src_path), "blk.txt", len(data))
    parts = list(utf8_blocks(src, block))
    assert b"".join(raw for raw, _ in parts) == data
    return "".join(text for _, text in parts)


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60),
       block=st.integers(1, 9))
def test_utf8_blocks_reassemble_characters_split_across_blocks(tmp_path_factory, text, block):
    check_blocks.tmp = tmp_path_factory.getbasetemp()
    assert check_blocks(text.encode("utf-8"), block) == text


@pytest.mark.parametrize("data, offset", [
    (b"abc\xffdef", 3), (b"ab\xe2\x82", 2), (b"\x80", 0), (b"ok \xc3\xa9 \xed\xa0\x80", 6)])
@pytest.mark.parametrize("block", [1, 2, 1 << 20])
def test_utf8_error_names_file_and_byte_offset(tmp_path, data, offset, block):
    check_blocks.tmp = tmp_path
    expected = rf"blk\.txt is not valid UTF-8: .*at byte offset {offset} "
    with pytest.raises(UserError, match=expected):
        check_blocks(data, block)


# -- damaged and foreign files ----------------------------------------------------------


@pytest.fixture
def good_corpus(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 200)    # 2000 tokens, vocab 10
    out = tmp_path / "good.h5"
    prepare([str(tmp_path / "t.txt")], str(out), quiet=True)
    return out


def test_flipped_chunk_bytes_fail_the_checksum(good_corpus):
    with h5py.File(good_corpus, "r") as f:
        info = f["train/tokens"].id.get_chunk_info(0)
    with open(good_corpus, "r+b") as fh:
        fh.seek(info.byte_offset + 100)
        byte = fh.read(1)
        fh.seek(info.byte_offset + 100)
        fh.write(bytes([byte[0] ^ 0x01]))
    corpus = Corpus.open(good_corpus)            # metadata is fine: opens lazily
    with pytest.raises(UserError, match=r"fails its checksums in /train/tokens"):
        corpus.split("train").load()
    assert corpus.split("val").load().size == 200   # the other split is intact
    corpus.close()
    with pytest.raises(UserError, match=r"fails its checksums in /train/tokens"):
        Corpus.open(good_corpus, verify=True)


def test_truncated_file_is_a_clear_error(good_corpus, tmp_path):
    data = good_corpus.read_bytes()
    for keep in (len(data) // 2, len(data) - 1, 100):
        cut = tmp_path / f"cut{keep}.h5"
        cut.write_bytes(data[:keep])
        with pytest.raises(UserError) as err:
            Corpus.open(cut, verify=True)
        assert "truncated" in str(err.value) or "not a readable HDF5" in str(err.value)
        assert "\n" not in str(err.value)


def test_token_beyond_vocab_is_caught_with_its_position(good_corpus):
    with h5py.File(good_corpus, "r+") as f:
        f["val/tokens"][123] = 70              # HDF5 updates fletcher32; only verify sees it
    Corpus.open(good_corpus).close()           # a plain open does not read the data
    expected = "token id 70 >= vocab_size 10 in /val/tokens at position 123"
    with pytest.raises(UserError, match=expected):
        Corpus.open(good_corpus, verify=True)


def test_stale_attributes_are_caught(good_corpus):
    with h5py.File(good_corpus, "r+") as f:
        f["train/tokens"][5] = 0               # still a valid id, but the sha256 changes
    with pytest.raises(UserError, match="fails its checksums in /train/tokens .sha256"):
        Corpus.open(good_corpus, verify=True)


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.attrs.__setitem__("format", "other"), "is not an hpcps corpus"),
    (lambda f: f.attrs.__setitem__("format_version", 2),
     "has format_version 2; this hpcps reads version 1"),
    (lambda f: f.__delitem__("val"), "lacks the 1-D dataset /val/tokens"),
    (lambda f: f.attrs.__delitem__("vocab_size"), "lacks root attribute.*vocab_size"),
    (lambda f: f.attrs.__setitem__("tokenizer", "{oops"), "unreadable tokenizer definition"),
])
def test_structural_problems(good_corpus, mutate, message):
    with h5py.File(good_corpus, "r+") as f:
        mutate(f)
    with pytest.raises(UserError, match=message):
        Corpus.open(good_corpus)


def test_open_errors_and_split_names(tmp_path, good_corpus):
    with pytest.raises(UserError, match="corpus file not found"):
        Corpus.open(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("just text")
    with pytest.raises(UserError, match="is not a readable HDF5 file"):
        Corpus.open(tmp_path / "text.h5")
    with pytest.raises(UserError, match="is a directory"):
        Corpus.open(tmp_path)
    with Corpus.open(good_corpus) as corpus:
        with pytest.raises(UserError, match="unknown split 'test'"):
            corpus.split("test")
        with pytest.raises(IndexError):
            corpus.split("val").read(0, 10**9)


def test_failed_prepare_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    out = tmp_path / "c.h5"
    out.write_bytes(b"previous corpus")

    def boom(self):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(corpus_mod.CorpusWriter, "commit", boom)
    with pytest.raises(RuntimeError):
        prepare([str(tmp_path / "t.txt")], str(out), overwrite=True, quiet=True)
    assert out.read_bytes() == b"previous corpus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "t.txt"]
