"""Record inputs of ``hpcps prepare``: JSON Lines (plain and gzip), JSON arrays, Parquet and
``datasets.save_to_disk`` folders; one document per record, each ending with the
end-of-text token; and every bad input as one line naming the file and line or row."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mpi_util import assert_one_line_error

import hpcps.data.records as records_mod
from hpcps.data.corpus import Corpus
from hpcps.data.inputs import Source, resolve_inputs
from hpcps.data.prepare import prepare
from hpcps.data.records import iter_records
from hpcps.data.tokenizer import EOT_TEXT
from hpcps.errors import UserError

pytestmark = pytest.mark.timeout(120)

DOCS = ["First doc.\nWith two lines.", "", "Second: naïve café 🙂", "third\n\n  indented\n",
        "fifth, the last one"]
SENTINEL = b"an older corpus that must survive\n"


class Read:
    """What a test checks of a corpus, read with full verification."""

    def __init__(self, path):
        with Corpus.open(path, verify=True) as corpus:
            self.ids = np.concatenate([corpus.split("train").load(), corpus.split("val").load()])
            self.tokenizer = corpus.tokenizer
            self.text = self.tokenizer.decode(self.ids)
            self.attrs = dict(corpus.attrs)
            self.documents = corpus.documents()


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as fh:
        for i, doc in enumerate(docs):
            fh.write(json.dumps({"id": i, field: doc}) + "\n")
            if i == 0:
                fh.write("\n")                  # blank lines are skipped


@pytest.fixture
def record_files(tmp_path):
    """One file of each JSON kind holding DOCS in order: (paths, docs in stream order)."""
    write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": DOCS[2]}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in DOCS[3:]], indent=2),
                                     encoding="utf-8")
    return [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.json"], list(DOCS)


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_json_records_are_documents_each_ending_with_eot(tmp_path, record_files, kind):
    paths, docs = record_files
    out = tmp_path / f"{kind}.h5"
    prepare([str(p) for p in paths], str(out), tokenizer=kind, quiet=True)
    corpus = Read(out)
    assert corpus.text == "".join(d + EOT_TEXT for d in docs)
    tok = corpus.tokenizer
    if kind == "byte":
        assert (tok.vocab_size, tok.eot_id) == (257, 256)
    else:
        assert tok.vocab_size == len(set("".join(docs))) + 1 and tok.eot_id == tok.vocab_size - 1
    assert corpus.attrs["eot_token"] == tok.eot_id and corpus.attrs["text_field"] == "text"
    # the end-of-text id sits exactly after every document
    lengths = [len(d) if kind == "char" else len(d.encode("utf-8")) for d in docs]
    ends = np.cumsum([n + 1 for n in lengths]) - 1
    assert np.flatnonzero(corpus.ids == tok.eot_id).tolist() == ends.tolist()
    rows = corpus.documents
    assert [r["name"] for r in rows] == [str(p) for p in paths]
    assert [r["token_end"] - r["token_start"] for r in rows] == \
        [lengths[0] + lengths[1] + 2, lengths[2] + 1, lengths[3] + lengths[4] + 2]
    assert [r["n_bytes"] for r in rows] == [p.stat().st_size for p in paths]


def test_plain_text_corpus_has_no_eot_but_mixed_input_does(tmp_path, record_files):
    paths, docs = record_files
    (tmp_path / "t.txt").write_text("plain text\n", encoding="utf-8")
    out = tmp_path / "plain.h5"
    prepare([str(tmp_path / "t.txt")], str(out), quiet=True)
    corpus = Read(out)
    assert corpus.text == "plain text\n" and corpus.tokenizer.eot_id is None  # nanoGPT layout
    assert "eot_token" not in corpus.attrs
    out = tmp_path / "mixed.h5"
    prepare([str(tmp_path / "t.txt"), str(paths[0])], str(out), tokenizer="byte", quiet=True)
    assert Read(out).text == "plain text\n" + EOT_TEXT + "".join(
        d + EOT_TEXT for d in docs[:2])


def test_bpe_with_records_gets_an_eot_special_token(tmp_path, record_files):
    pytest.importorskip("tokenizers")
    paths, docs = record_files
    out = tmp_path / "bpe.h5"
    prepare([str(p) for p in paths], str(out), tokenizer="bpe", vocab_size=300, quiet=True)
    corpus = Read(out)
    assert corpus.text == "".join(d + EOT_TEXT for d in docs)
    tok = corpus.tokenizer
    expected = np.concatenate([np.append(tok.encode(d), tok.eot_id) for d in docs])
    assert corpus.ids.tolist() == expected.tolist()


def test_json_file_holding_json_lines_and_text_field(tmp_path):
    write_jsonl(tmp_path / "lines.json", ["one", "two"], field="body")   # datasets' to_json
    out = tmp_path / "c.h5"
    prepare([str(tmp_path / "lines.json")], str(out), tokenizer="byte", text_field="body",
            quiet=True)
    assert Read(out).text == f"one{EOT_TEXT}two{EOT_TEXT}"
    with pytest.raises(UserError, match=r"lines.json line 1: no 'text' field \(fields: id, body"):
        prepare([str(tmp_path / "lines.json")], str(tmp_path / "d.h5"), quiet=True)
    # a byte order mark before a JSON array is not an error
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf[{"text": "one"}, {"text": "two"}]')
    prepare([str(tmp_path / "bom.json")], str(tmp_path / "bom.h5"), tokenizer="byte", quiet=True)
    assert Read(tmp_path / "bom.h5").text == f"one{EOT_TEXT}two{EOT_TEXT}"


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(max_size=12), max_size=6), indent=st.sampled_from([None, 0, 3]),
       read=st.integers(1, 7))
def test_json_array_reader_with_tiny_reads(tmp_path_factory, texts, indent, read):
    path = tmp_path_factory.mktemp("arr") / "a.json"
    path.write_text(json.dumps([{"text": t, "n": [1, {"x": "]"}]} for t in texts],
                               indent=indent, ensure_ascii=False), encoding="utf-8")
    source = Source(str(path), "a.json", path.stat().st_size, "json")
    old = records_mod.JSON_READ_BYTES
    records_mod.JSON_READ_BYTES = read     # elements and characters cut across every read
    try:
        got = list(iter_records(source, "text"))
    finally:
        records_mod.JSON_READ_BYTES = old
    assert [t for t, _ in got] == texts
    assert sum(n for _, n in got) <= path.stat().st_size


def test_jsonl_byte_ranges_split_at_line_starts(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["aa", "bb", "cc", "dd"])
    path = tmp_path / "a.jsonl"
    source = Source(str(path), "a.jsonl", path.stat().st_size, "jsonl")
    data = path.read_bytes()
    third = data.index(b'{"id": 2')
    assert [t for t, _ in iter_records(source, "text", 0, third)] == ["aa", "bb"]
    assert [t for t, _ in iter_records(source, "text", third, None)] == ["cc", "dd"]


def test_parquet_row_groups_and_datasets_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    datasets = pytest.importorskip("datasets")
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), tmp_path / "d.parquet",
                   row_group_size=2)
    folder = tmp_path / "corpus" / "saved"
    datasets.Dataset.from_dict({"text": DOCS[:3], "n": [1, 2, 3]}).save_to_disk(str(folder))
    (tmp_path / "corpus" / "a.txt").write_text("text file\n", encoding="utf-8")
    sources, _ = resolve_inputs([str(tmp_path / "d.parquet"), str(tmp_path / "corpus")])
    assert [(s.fmt, s.name.split("/")[-1]) for s in sources] == \
        [("parquet", "d.parquet"), ("text", "a.txt"), ("arrow", "data-00000-of-00001.arrow")]
    out = tmp_path / "c.h5"
    prepare([str(tmp_path / "d.parquet"), str(tmp_path / "corpus")], str(out), quiet=True)
    expected = "".join(d + EOT_TEXT for d in DOCS) + "text file\n" + EOT_TEXT + \
        "".join(d + EOT_TEXT for d in DOCS[:3])
    assert Read(out).text == expected
    # the row groups a parallel rank asks for, by nominal byte offset
    source = sources[0]
    groups = len(DOCS) // 2 + 1
    second = source.n_bytes * 1 // groups
    assert [t for t, _ in iter_records(source, "text", 0, second)] == DOCS[:2]
    assert [t for t, _ in iter_records(source, "text", second, None)] == DOCS[2:]


# -- bad input: exit 2, one line naming the file and line or row, nothing left behind ------------


def hpcps(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hpcps", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=110)


def _tokenizer_json(vocab_extra: int = 0) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {
                "a": 0, "[UNK]": 1, "<|endoftext|>": 2, "huge": 2 + vocab_extra}}}


def _write_bad_inputs(root):
    (root / "ok.txt").write_text("some fine text\n" * 10)
    (root / "notjson.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    (root / "nofield.jsonl").write_text('{"text": "a"}\n\n{"body": "b", "id": 3}\n')
    (root / "number.jsonl").write_text('{"text": "a"}\n{"text": 7}\n')
    (root / "notobject.jsonl").write_text('["text"]\n')
    (root / "surrogate.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 x"}\n')
    (root / "element.json").write_text('[\n {"text": "a"},\n {"txt": "b"}\n]')
    (root / "truncated.json").write_text('[\n {"text": "a"},\n {"text": "b"')
    (root / "scalar.json").write_text('"just a string"')
    (root / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:40])
    (root / "badline.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": \n'))
    (root / "dd").mkdir()
    (root / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (root / "tok_bad.json").write_text('{\n  "model": {\n    "type": "BPE",\n    "vocab": {"a": 0,}\n'
                                       '  }\n}\n')
    (root / "tok_huge.json").write_text(json.dumps(_tokenizer_json(2**32), indent=2))
    (root / "tok_noeot.json").write_text(json.dumps({**_tokenizer_json(), "model": {
        "type": "WordLevel", "unk_token": "[UNK]", "vocab": {"a": 0, "[UNK]": 1}}}))
    (root / "tok_lib.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    pq.write_table(pa.table({"body": ["x", "y"]}), root / "nocol.parquet")
    pq.write_table(pa.table({"text": ["x", None, "z"]}), root / "null.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), root / "ints.parquet")
    (root / "fake.parquet").write_text("not parquet at all")


BAD = {  # case: (args, fragments of the one error line, package the case needs)
    "jsonl line not JSON": (["notjson.jsonl"],
                            ["input notjson.jsonl line 3: not valid JSON at column 10 (Expecting value)"], None),
    "jsonl record without the field": (["nofield.jsonl"],
                                       ["input nofield.jsonl line 3: no 'text' field",
                                        "(fields: body, id;"], None),
    "jsonl text not a string": (["number.jsonl"],
                                ["number.jsonl line 2: 'text' is a number, not a string"], None),
    "jsonl record not an object": (["notobject.jsonl"],
                                   ["notobject.jsonl line 1: expected a JSON object, got an array"],
                                   None),
    "jsonl lone surrogate": (["surrogate.jsonl"],
                             ["surrogate.jsonl line 2: 'text' holds the lone surrogate U+D800"],
                             None),
    "json element without the field": (["element.json"],
                                       ["input element.json element 1 (line 3): no 'text' field"],
                                       None),
    "json array cut short": (["truncated.json"], ["truncated.json line 3: not valid JSON"], None),
    "json neither array nor lines": (["scalar.json"],
                                     ["scalar.json line 1: expected a JSON array of objects"], None),
    "gzip cut short": (["broken.jsonl.gz"], ["broken.jsonl.gz is not a readable gzip file"], None),
    "gzip line not JSON": (["badline.jsonl.gz"], ["badline.jsonl.gz line 2: not valid JSON"], None),
    "datasets dict folder": (["dd"], ["is a datasets DatasetDict folder"], None),
    "text field for text input": (["ok.txt", "--text-field", "body"],
                                  ["--text-field only applies to JSON, Parquet and datasets"], None),
    "parquet without the column": (["nocol.parquet"],
                                   ["input nocol.parquet has no column 'text' (columns: body;"],
                                   "pyarrow"),
    "parquet null row": (["null.parquet"], ["input null.parquet row 1: 'text' is null"], "pyarrow"),
    "parquet column not strings": (["ints.parquet"], ["ints.parquet: column 'text' holds int64"],
                                   "pyarrow"),
    "not a parquet file": (["fake.parquet"], ["fake.parquet is not a readable Parquet file"],
                           "pyarrow"),
    "tokenizer file not JSON": (["ok.txt", "--tokenizer-file", "tok_bad.json"],
                                ["tokenizer file tok_bad.json line 4 column 22: not valid JSON"],
                                None),
    "tokenizer vocab over uint32": (["ok.txt", "--tokenizer-file", "tok_huge.json"],
                                    ["tokenizer file tok_huge.json line 19: token 'huge' has id "
                                     "4294967298", "does not fit uint32"], None),
    "tokenizer the library rejects": (["ok.txt", "--tokenizer-file", "tok_lib.json"],
                                      ["tokenizer file tok_lib.json does not load in the "
                                       "tokenizers library"], "tokenizers"),
    "tokenizer without eot": (["ok.txt", "--tokenizer-file", "tok_noeot.json"],
                              ["tok_noeot.json defines none of the end-of-text tokens"],
                              "tokenizers"),
    "eot token not in file": (["ok.txt", "--tokenizer-file", "tok_noeot.json", "--eot-token", "</s>"],
                              ["tok_noeot.json has no token '</s>'"], "tokenizers"),
    "missing tokenizer file": (["ok.txt", "--tokenizer-file", "nope.json"],
                               ["cannot read tokenizer file nope.json"], None),
    "two tokenizers": (["ok.txt", "--tokenizer", "bpe", "--tiktoken", "cl100k_base"],
                       ["give one of --tokenizer, --tokenizer-file, --tiktoken"], None),
    "vocab size with a pretrained tokenizer": (["ok.txt", "--tiktoken", "x", "--vocab-size", "9"],
                                               ["--vocab-size does not apply"], None),
    "eot token without tokenizer file": (["ok.txt", "--eot-token", "</s>"],
                                         ["--eot-token only applies to --tokenizer-file"], None),
    "tiktoken encoding not offline": (["ok.txt", "--tiktoken", "p50k_base"],
                                      ["tiktoken encoding 'p50k_base' is not available offline"],
                                      "tiktoken"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_place_and_leaves_nothing(tmp_path, case):
    args, fragments, needs = BAD[case]
    if needs:
        pytest.importorskip(needs)
    _write_bad_inputs(tmp_path)
    out = tmp_path / "out.h5"
    out.write_bytes(SENTINEL)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = hpcps("prepare", *args, "-o", out, "--overwrite", cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert out.read_bytes() == SENTINEL
    assert sorted(p.name for p in tmp_path.iterdir()) == before      # no .tmp, no .parts


def test_good_inputs_of_the_bad_input_fixture_do_prepare(tmp_path):
    """Control for the table above: the same kind of files, well formed, succeed."""
    _write_bad_inputs(tmp_path)
    write_jsonl(tmp_path / "good.jsonl", ["a", "b"])
    (tmp_path / "good.json").write_text('[\n {"text": "a"},\n {"text": "b"}\n]')
    out = tmp_path / "good.h5"
    proc = hpcps("prepare", "good.jsonl", "good.json", "-o", out, "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Read(out).text == f"a{EOT_TEXT}b{EOT_TEXT}" * 2
