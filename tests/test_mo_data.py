"""gettext catalogs -> sequence corpora: reading .mo files (written here by a tiny
writer, so nothing depends on the machine's /usr/share/locale), cleaning, the
parallel and language-identification builders, the HDF5 format and its reader,
and the ``hpcps prepare --parallel / --langid`` command line."""

from __future__ import annotations

import struct

import h5py
import numpy as np
import pytest

from hpcps.cli import main as hpcps_main
from hpcps.data import build_mo
from hpcps.data.mo import Message, catalog_paths, read_catalog, require_catalogs
from hpcps.data.seqcorpus import SequenceCorpus
from hpcps.errors import UserError

pytestmark = pytest.mark.timeout(60)

HEADER = ("Project-Id-Version: demo\nContent-Type: text/plain; charset={charset}\n"
          "Plural-Forms: nplurals=2; plural=(n != 1);\n")


def write_mo(path, entries, charset="UTF-8", big_endian=False, header=True):
    """A GNU .mo file: header word block, two (length, offset) tables, NUL-terminated
    strings. ``entries``: (msgid, msgstr) with msgstr a list for plural entries."""
    items = [("", HEADER.format(charset=charset))] if header else []
    items += [(k, "\0".join(v) if isinstance(v, list) else v) for k, v in entries]
    encoding = "utf-8" if charset == "CHARSET" else charset     # a msginit template
    items.sort(key=lambda kv: kv[0].encode(encoding))
    ids = [k.encode(encoding) for k, _ in items]
    strs = [v.encode(encoding) for _, v in items]
    n = len(items)
    end = ">" if big_endian else "<"
    orig_table, trans_table = 28, 28 + 8 * n
    pos = 28 + 16 * n
    tables, blob = [], b""
    for group in (ids, strs):
        for s in group:
            tables.append((len(s), pos + len(blob)))
            blob += s + b"\0"
    head = struct.pack(end + "7I", 0x950412DE, 0, n, orig_table, trans_table, 0, pos)
    body = b"".join(struct.pack(end + "2I", length, off) for length, off in tables)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + body + blob)
    return path


def catalog(root, lang, domain, entries, **kw):
    return write_mo(root / lang / "LC_MESSAGES" / f"{domain}.mo", entries, **kw)


# -- reading catalogs ---------------------------------------------------------------------

def test_read_catalog_skips_header_and_empty_and_reads_contexts_and_plurals(tmp_path):
    path = catalog(tmp_path, "de", "app", [
        ("Open", "Öffnen"), ("Untranslated", ""), ("menu\x04File", "Datei"),
        ("%d file\x00%d files", ["%d Datei", "%d Dateien"])])
    got = read_catalog(str(path))
    assert got == [Message("%d file", "%d Datei", "", 0, "app"),
                   Message("%d file", "%d Dateien", "", 1, "app"),
                   Message("File", "Datei", "menu", -1, "app"),
                   Message("Open", "Öffnen", "", -1, "app")]


def test_read_catalog_big_endian_and_latin1(tmp_path):
    be = catalog(tmp_path, "fr", "be", [("Yes", "Oui")], big_endian=True)
    assert read_catalog(str(be)) == [Message("Yes", "Oui", domain="be")]
    latin = catalog(tmp_path, "fr", "latin", [("Summer", "Été")], charset="ISO-8859-1")
    assert read_catalog(str(latin))[0].msgstr == "Été"


def test_read_catalog_reports_damage_and_skips_templates(tmp_path):
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"not a catalog at all")
    with pytest.raises(UserError, match="bad.mo is not a readable .mo catalog"):
        read_catalog(str(bad))
    good = catalog(tmp_path, "de", "cut", [("Open", "Öffnen"), ("Close", "Schließen")])
    cut = tmp_path / "cut.mo"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(UserError, match="not a readable .mo catalog"):
        read_catalog(str(cut))
    template = catalog(tmp_path, "de", "tmpl", [("Open", "Open!")], charset="CHARSET")
    assert read_catalog(str(template)) == []
    with pytest.raises(UserError, match="catalog not found"):
        read_catalog(str(tmp_path / "missing.mo"))


def test_missing_language_names_the_languages_that_exist(tmp_path):
    for domain in ("a", "b", "c"):
        catalog(tmp_path, "de", domain, [("Open", "Öffnen")])
    catalog(tmp_path, "fr", "a", [("Open", "Ouvrir")])
    assert [p.rsplit("/", 1)[1] for p in catalog_paths(str(tmp_path), "de")] == \
        ["a.mo", "b.mo", "c.mo"]
    with pytest.raises(UserError, match=r"no \.mo catalogs for language 'zh_CN'.*"
                                        r"catalogs found for de \(3\), fr \(1\)"):
        require_catalogs(str(tmp_path), "zh_CN")
    with pytest.raises(UserError, match="--mo-root .* does not exist"):
        require_catalogs(str(tmp_path / "nope"), "de")


# -- cleaning -----------------------------------------------------------------------------

@pytest.mark.parametrize("raw,clean", [
    ("_Open", "Open"), ("Save _As…", "Save As…"), ("&Quit", "Quit"),
    ("Tom && Jerry", "Tom & Jerry"), ("打开(_O)", "打开"), ("保存(&S)...", "保存..."),
    ("<b>Bold</b>   text\n here", "Bold text here"),
    ("a &lt; b &amp; c", "a < b & c"), ("file_name_here", "file_name_here"),
    ("Line<br/>break", "Line break"), ("R&D &amp; more", "RD & more"),
])
def test_accelerators_markup_and_whitespace_are_stripped(raw, clean):
    assert build_mo.strip_accelerators_and_markup(raw) == clean


def test_clean_message_drops_format_only_long_and_empty():
    stats = build_mo.CleanStats()
    assert build_mo.clean_message("%s: %d", 50, stats=stats) is None
    assert build_mo.clean_message("{0} ${HOME} %(name)s", 50, stats=stats) is None
    assert build_mo.clean_message("x" * 51, 50, stats=stats) is None
    assert build_mo.clean_message("<b></b>", 50, stats=stats) is None
    assert build_mo.clean_message("Delete %s?", 50, stats=stats) == "Delete %s?"
    assert build_mo.clean_message("Ja", 50, min_letters=3, stats=stats) is None
    assert stats.dropped == {"format-only/short": 3, "too long": 1, "empty": 1}


# -- the builders -------------------------------------------------------------------------

SENTENCES = [f"Message number {i} about {w}" for i, w in
             enumerate(["files", "folders", "printers", "windows", "fonts", "colours"] * 5)]


@pytest.fixture
def locale_root(tmp_path):
    root = tmp_path / "locale"
    zh = [(s, f"消息{i}号") for i, s in enumerate(SENTENCES)]
    catalog(root, "zh_CN", "one", zh[:20] + [("_Open", "打开(_O)"), ("Same", "Same"),
                                             ("%s", "%s"), ("Close", "关闭")])
    catalog(root, "zh_CN", "two",
            zh[10:] + [("Close", "关上"), ("Close\x00Closes", ["关闭", "x"])])
    catalog(root, "zh_CN", "three", [("Close", "关闭")])
    catalog(root, "de", "one", [(s, f"Nachricht Nummer {i}") for i, s in enumerate(SENTENCES)]
            + [("Shared", "Gemeinsam"), ("Yes", "Ja")])
    catalog(root, "fr", "one", [(s, f"Message numéro {i} à propos") for i, s in
                                enumerate(SENTENCES[:20])] + [("Shared", "Gemeinsam")])
    return root


def test_collect_pairs_cleans_and_keeps_the_most_frequent_translation(locale_root):
    pairs, stats = build_mo.collect_pairs(str(locale_root), "en", "zh_CN")
    found = dict(pairs)
    assert found["Close"] == "关闭"                   # 2 catalogs + the plural's form 0 vs 1
    assert found["Open"] == "打开"
    assert "Same" not in found and "%s" not in found
    assert len(pairs) == len(SENTENCES) + 2
    assert stats.catalogs == 3 and stats.dropped["untranslated"] == 2


def test_collect_pairs_errors(locale_root):
    with pytest.raises(UserError, match="source language must be 'en'"):
        build_mo.collect_pairs(str(locale_root), "de", "zh_CN")
    with pytest.raises(UserError, match="no .mo catalogs for language 'ja'.*zh_CN \\(3\\)"):
        build_mo.collect_pairs(str(locale_root), "en", "ja")


def test_build_parallel_writes_a_verified_corpus_split_by_source(locale_root, tmp_path):
    out = tmp_path / "enzh.h5"
    result = build_mo.build_parallel(str(out), "en:zh_CN", str(locale_root), tokenizer="char",
                                     val_fraction=0.3)
    assert "parallel corpus" in result.summary()
    with SequenceCorpus.open(out, verify=True) as corpus:
        assert corpus.kind == "parallel" and (corpus.src_lang, corpus.tgt_lang) == ("en", "zh_CN")
        train, val = corpus.split("train"), corpus.split("val")
        assert train.n + val.n == len(SENTENCES) + 2 and val.n > 0
        src_train = set(train.texts("src", range(train.n)))
        src_val = set(val.texts("src", range(val.n)))
        assert not src_train & src_val
        for s in src_val:                       # membership is a function of the sentence
            assert build_mo.hash_fraction(s) < 0.3
        tok = corpus.tokenizers
        idx = [val.n - 1, 0, 0]
        for field in ("src", "tgt"):
            decoded = [tok[field].decode(ids) for ids in val.get(field, idx)]
            assert decoded == val.texts(field, idx)
    with h5py.File(out) as fh:
        assert fh["train/src_tokens"].fletcher32 and fh["val/tgt_offsets"].fletcher32
        assert fh["train/src_offsets"].dtype == np.int64 and fh.attrs["format"] == "hpcps-corpus"
    # deterministic: the same input gives the same file contents
    again = tmp_path / "again.h5"
    build_mo.build_parallel(str(again), "en:zh_CN", str(locale_root), val_fraction=0.3)
    with SequenceCorpus.open(again) as other, SequenceCorpus.open(out) as first:
        a, b = other.split("train"), first.split("train")
        assert a.texts("tgt", range(a.n)) == b.texts("tgt", range(b.n))


def test_build_langid_is_balanced_and_drops_shared_strings(locale_root, tmp_path):
    out = tmp_path / "langid.h5"
    build_mo.build_langid(str(out), "de,fr", str(locale_root), tokenizer="byte",
                          val_fraction=0.25)
    with SequenceCorpus.open(out, verify=True) as corpus:
        assert corpus.kind == "classification" and corpus.label_names == ["de", "fr"]
        texts, labels = [], []
        for name in ("train", "val"):
            split = corpus.split(name)
            texts += split.texts("text", range(split.n))
            labels += split.labels.tolist()
        assert np.bincount(labels).tolist() == [20, 20]          # capped at fr's 20
        assert "Gemeinsam" not in texts and "Ja" not in texts     # shared / too short
        assert all(("Nachricht" in t) == (lab == 0) for t, lab in zip(texts, labels))
    with pytest.raises(UserError, match="at least two"):
        build_mo.build_langid(str(tmp_path / "x.h5"), "de", str(locale_root))
    with pytest.raises(UserError, match="more than once"):
        build_mo.build_langid(str(tmp_path / "x.h5"), "de,fr,de", str(locale_root))
    with pytest.raises(UserError, match="no .mo catalogs for language 'xx'"):
        build_mo.build_langid(str(tmp_path / "x.h5"), "de,xx", str(locale_root))


# -- the reader's errors ------------------------------------------------------------------

def test_sequence_corpus_reader_errors(locale_root, tmp_path, make_corpus):
    with pytest.raises(UserError, match="corpus file not found"):
        SequenceCorpus.open(tmp_path / "none.h5")
    lm = make_corpus("hello world " * 50)
    with pytest.raises(UserError, match="'lm' corpus, not a sequence corpus"):
        SequenceCorpus.open(lm)
    out = tmp_path / "p.h5"
    build_mo.build_parallel(str(out), "en:zh_CN", str(locale_root), val_fraction=0.3)
    with SequenceCorpus.open(out) as corpus:
        with pytest.raises(UserError, match="has no field 'text'"):
            corpus.split("train").get("text", [0])
        with pytest.raises(UserError, match="no labels"):
            corpus.split("train").labels
        with pytest.raises(UserError, match="unknown split"):
            corpus.split("test")
    with h5py.File(out, "r") as fh:                      # flip bytes inside a checksummed chunk
        offset = fh["train/tgt_tokens"].id.get_chunk_info(0).byte_offset
    raw = bytearray(out.read_bytes())
    raw[offset] ^= 0xFF
    out.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="fails its checksums in /train/tgt_tokens"):
        SequenceCorpus.open(out, verify=True)
    with h5py.File(out, "r+") as fh:
        del fh["val/tgt_text"]
    with pytest.raises(UserError, match="lacks /val/tgt_text"):
        SequenceCorpus.open(out)


# -- the command line ---------------------------------------------------------------------

def test_prepare_parallel_and_langid_from_the_command_line(locale_root, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert hpcps_main(["prepare", "--parallel", "en:zh_CN", "--mo-root", str(locale_root),
                       "-o", str(out), "--val-fraction", "0.3"]) == 0
    assert "parallel corpus" in capsys.readouterr().out
    assert SequenceCorpus.open(out).tokenizers["tgt"].kind == "char"
    out2 = tmp_path / "lid.h5"
    assert hpcps_main(["prepare", "--langid", "de,fr", "--mo-root", str(locale_root),
                       "-o", str(out2), "--val-fraction", "0.25"]) == 0
    assert SequenceCorpus.open(out2).tokenizers["text"].kind == "byte"
    assert hpcps_main(["prepare", "--parallel", "en:ja", "--mo-root", str(locale_root),
                       "-o", str(tmp_path / "n.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "catalogs found for zh_CN (3), de (1), fr (1)" in err
    assert hpcps_main(["prepare", "--parallel", "en:zh_CN", "--langid", "de,fr",
                       "-o", str(tmp_path / "n.h5")]) == 2
    assert hpcps_main(["prepare", "some.txt", "--langid", "de,fr",
                       "-o", str(tmp_path / "n.h5")]) == 2
    assert "not both" in capsys.readouterr().err


def test_parallel_tokenizers_per_side_and_joint(locale_root, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    mixed = tmp_path / "mixed.h5"
    assert hpcps_main(["prepare", "--parallel", "en:zh_CN", "--mo-root", str(locale_root),
                       "-o", str(mixed), "--val-fraction", "0.3", "--tokenizer", "bpe",
                       "--vocab-size", "300", "--tgt-tokenizer", "char"]) == 0
    assert "tokenizers bpe 300 / char" in capsys.readouterr().out
    joint = tmp_path / "joint.h5"
    assert hpcps_main(["prepare", "--parallel", "en:zh_CN", "--mo-root", str(locale_root),
                       "-o", str(joint), "--val-fraction", "0.3", "--tokenizer", "bpe",
                       "--vocab-size", "300", "--joint-vocab"]) == 0
    assert "tokenizers bpe joint 300" in capsys.readouterr().out
    with SequenceCorpus.open(mixed, verify=True) as m, SequenceCorpus.open(joint, verify=True) as j:
        assert (m.tokenizers["src"].kind, m.tokenizers["tgt"].kind) == ("bpe", "char")
        assert j.tokenizers["src"].to_json() == j.tokenizers["tgt"].to_json()
        assert j.tokenizers["src"].to_json() != m.tokenizers["src"].to_json()  # both sides' text
        val = j.split("val")
        for field in ("src", "tgt"):                 # every val string round-trips
            assert [j.tokenizers[field].decode(t) for t in val.get(field, range(val.n))] == \
                val.texts(field, range(val.n))
    # the BPE merges come from the train split alone (training is deterministic)
    from hpcps.data.tokenizer import BPETokenizer
    with SequenceCorpus.open(mixed) as m:
        train, val = m.split("train"), m.split("val")
        sources = train.texts("src", range(train.n))
        learnt = BPETokenizer.train(iter(sources), 300)
        with_val = BPETokenizer.train(iter(sources + val.texts("src", range(val.n))), 300)
        assert m.tokenizers["src"].to_json() == learnt.to_json() != with_val.to_json()
    for argv, expected in ((["--joint-vocab"], "--joint-vocab needs --tokenizer bpe"),
                           (["--tokenizer", "char", "--vocab-size", "300"],
                            "--vocab-size only applies to --tokenizer bpe")):
        assert hpcps_main(["prepare", "--parallel", "en:zh_CN", "--mo-root", str(locale_root),
                           "-o", str(tmp_path / "bad.h5"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert hpcps_main(["prepare", "--langid", "de,fr", "--mo-root", str(locale_root),
                       "-o", str(tmp_path / "bad.h5"), "--joint-vocab"]) == 2
    assert "apply to --parallel corpora" in capsys.readouterr().err
