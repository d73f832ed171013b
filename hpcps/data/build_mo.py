"""Sequence corpora from gettext catalogs: ``hpcps prepare --parallel`` and ``--langid``.

- ``--parallel en:zh_CN``: every catalog of the target language gives (English
  msgid, translated msgstr) pairs. Cleaned (see ``clean_message``), then one pair
  per English sentence (its most frequent translation across catalogs).
- ``--langid de,fr,...``: each language's translated strings labelled with the
  language; strings that occur in more than one language are dropped (they say
  nothing about the language) and every language is capped at the same count.

The val split is chosen by a hash of the source string (the text itself for
langid), so one sentence never lands in both splits, and items are stored in
hash order, so any prefix of a split is a fair sample of it.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from hpcps.data.mo import read_catalog, require_catalogs
from hpcps.data.prepare import check_options, check_output
from hpcps.data.seqcorpus import SplitItems, write_sequence_corpus
from hpcps.data.tokenizer import (
    DEFAULT_BPE_VOCAB,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
)
from hpcps.errors import UserError

DEFAULT_MO_ROOT = "/usr/share/locale"
DEFAULT_MAX_CHARS = 200
DEFAULT_MIN_LETTERS = 3        # langid: shorter strings ("OK", "Ja") hardly name a language
DEFAULT_VAL_FRACTION = 0.1

# printf (%s, %1$d, %-5.2f, %lld), Python (%(name)s, {0}, {name}), shell ($HOME, ${x}),
# Windows (%NAME%) placeholders: a string with nothing else is not a sentence
_FORMAT = re.compile(
    r"%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t|I64|I32)?"
    r"[diouxXeEfFgGaAcspnm%]"
    r"|%\([^)]*\)[-+ #0]*\d*(?:\.\d+)?[diouxXeEfFgGcrs]"
    r"|\{[^{}]*\}|\$\{\w+\}|\$\w+|%[A-Z_]+%")
# GTK / Qt accelerators as CJK translations write them: "打开(_O)", "保存(&S)"
_CJK_ACCEL = re.compile(r"\s*[(（]\s*[_&]\s*[A-Za-z0-9]\s*[)）]")
_TAGS = re.compile(
    r"</?(?:b|i|u|s|tt|big|small|span|a|p|br|em|strong|sub|sup|qt|html|body|code|kbd|li|ul|"
    r"ol|nobr|font|markup|link|literal|emphasis|command|filename|application|guilabel|"
    r"guimenu|keycap)\b[^<>]*/?>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);")
_AMP_ACCEL = re.compile(r"&(?!(?:[A-Za-z]+|#\d+|#x[0-9a-fA-F]+);)(?=\w)")
_UNDERSCORE_ACCEL = re.compile(r"(?<!_)_(?=\w)")
_SPACES = re.compile(r"\s+")
_DOUBLE_AMP = "\uE000"        # private-use placeholder for Qt's literal "&&"


def strip_accelerators_and_markup(text: str) -> str:
    """Remove keyboard accelerators (``_File``, ``&File``, ``文件(_F)``), simple markup
    tags (``<b>``, ``<span ...>``), unescape entities and collapse whitespace."""
    text = _CJK_ACCEL.sub("", text)
    text = _TAGS.sub(lambda m: " " if m.group(0)[1:3].lower() in ("br", "p>", "p ") else "",
                     text)
    text = text.replace("&&", _DOUBLE_AMP)
    text = _AMP_ACCEL.sub("", text)
    text = text.replace(_DOUBLE_AMP, "&")
    text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    if text.count("_") == 1:      # GTK: one mnemonic per label; more underscores: identifiers
        text = _UNDERSCORE_ACCEL.sub("", text)
    text = text.replace("__", "_")
    return _SPACES.sub(" ", text).strip()


def letters(text: str) -> int:
    """Letters outside format placeholders (0: a format-only string)."""
    return sum(ch.isalpha() for ch in _FORMAT.sub("", text))


@dataclass
class CleanStats:
    catalogs: int = 0
    unreadable: list = field(default_factory=list)
    messages: int = 0
    dropped: Counter = field(default_factory=Counter)
    kept: int = 0

    def describe(self) -> str:
        drops = ", ".join(f"{n:,} {why}" for why, n in sorted(self.dropped.items()) if n)
        text = (f"{self.catalogs} catalog(s), {self.messages:,} message(s), kept {self.kept:,}"
                + (f"; dropped {drops}" if drops else ""))
        if self.unreadable:
            text += f"; skipped {len(self.unreadable)} unreadable catalog(s)"
        return text


def clean_message(text: str, max_chars: int, min_letters: int = 1,
                  stats: Optional[CleanStats] = None) -> Optional[str]:
    """The cleaned string, or None when it should be dropped (reason counted in stats)."""
    def drop(why: str) -> None:
        if stats is not None:
            stats.dropped[why] += 1
    cleaned = strip_accelerators_and_markup(text)
    if not cleaned:
        drop("empty")
        return None
    if letters(cleaned) < min_letters:
        drop("format-only/short")
        return None
    if len(cleaned) > max_chars:
        drop("too long")
        return None
    return cleaned


def _read_all(paths: Sequence[str], stats: CleanStats):
    for path in paths:
        try:
            messages = read_catalog(path)
        except UserError as err:
            stats.unreadable.append(str(err))
            print(f"hpcps: warning: {err}; skipped", file=sys.stderr)
            continue
        stats.catalogs += 1
        yield from messages


def hash_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64


def split_by_hash(items: list, key_of, val_fraction: float) -> tuple[list, list]:
    """(train, val), each in hash order; an item is val when its key hashes below the fraction."""
    ordered = sorted(items, key=lambda it: (hash_fraction(key_of(it)), key_of(it)))
    train = [it for it in ordered if hash_fraction(key_of(it)) >= val_fraction]
    val = [it for it in ordered if hash_fraction(key_of(it)) < val_fraction]
    return train, val


# -- collecting --------------------------------------------------------------------------

def collect_pairs(mo_root: str, src_lang: str, tgt_lang: str,
                  max_chars: int = DEFAULT_MAX_CHARS) -> tuple[list, CleanStats]:
    """[(english, translation)] of ``tgt_lang``'s catalogs, cleaned and one per sentence."""
    if src_lang != "en":
        raise UserError(f"--parallel {src_lang}:{tgt_lang}: the source language must be 'en' "
                        "(catalog msgids are the English originals)")
    if tgt_lang == "en":
        raise UserError("--parallel en:en: choose a target language other than English")
    stats = CleanStats()
    translations: dict = defaultdict(Counter)
    for msg in _read_all(require_catalogs(mo_root, tgt_lang), stats):
        if msg.plural_form > 0:       # the English plural msgid is not in the catalog
            continue
        stats.messages += 1
        if msg.msgstr == msg.msgid:
            stats.dropped["untranslated"] += 1
            continue
        src = clean_message(msg.msgid, max_chars, stats=stats)
        tgt = None if src is None else clean_message(msg.msgstr, max_chars, stats=stats)
        if src is None or tgt is None:
            continue
        if src == tgt:
            stats.dropped["untranslated"] += 1
            continue
        translations[src][tgt] += 1
    pairs = []
    for src, counts in translations.items():
        best = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        stats.dropped["duplicate source"] += sum(counts.values()) - 1
        pairs.append((src, best))
    stats.kept = len(pairs)
    if not pairs:
        raise UserError(f"no usable en->{tgt_lang} pairs under {mo_root} ({stats.describe()})")
    return pairs, stats


def parse_languages(text: str) -> list[str]:
    langs = [part.strip() for part in text.split(",") if part.strip()]
    if len(langs) < 2:
        raise UserError(f"--langid needs at least two comma-separated languages, got {text!r}")
    repeated = sorted({lang for lang in langs if langs.count(lang) > 1})
    if repeated:
        raise UserError(f"--langid lists {', '.join(repeated)} more than once")
    return langs


def collect_langid(mo_root: str, langs: Sequence[str], max_chars: int = DEFAULT_MAX_CHARS,
                   min_letters: int = DEFAULT_MIN_LETTERS,
                   per_language: Optional[int] = None) -> tuple[list, CleanStats, int]:
    """[(text, label index)] balanced over ``langs``; returns (items, stats, cap)."""
    paths = {lang: require_catalogs(mo_root, lang) for lang in langs}   # fail before reading
    stats = CleanStats()
    texts: dict = {}
    for lang in langs:
        seen = set()
        for msg in _read_all(paths[lang], stats):
            stats.messages += 1
            if msg.msgstr == msg.msgid:
                stats.dropped["untranslated"] += 1
                continue
            text = clean_message(msg.msgstr, max_chars, min_letters, stats)
            if text is not None:
                seen.add(text)
        texts[lang] = seen
    owners = Counter(text for seen in texts.values() for text in seen)
    shared = {text for text, n in owners.items() if n > 1}
    stats.dropped["in several languages"] += sum(len(seen & shared) for seen in texts.values())
    # the cap keeps a pseudo-random subset: ordered by a hash unrelated to the split's hash
    available = {lang: sorted(seen - shared, key=lambda t: (hash_fraction("cap\0" + t), t))
                 for lang, seen in texts.items()}
    cap = min(len(v) for v in available.values())
    if per_language is not None:
        cap = min(cap, per_language)
    if cap == 0:
        empty = [lang for lang, v in available.items() if not v]
        raise UserError(f"--langid: no usable strings for {', '.join(empty)} under {mo_root}")
    items = []
    for label, lang in enumerate(langs):
        stats.dropped["over the per-language cap"] += len(available[lang]) - cap
        items.extend((text, label) for text in available[lang][:cap])
    stats.kept = len(items)
    return items, stats, cap


# -- tokenizing and writing --------------------------------------------------------------

def make_tokenizer(kind: str, vocab_size: Optional[int], texts: Iterable[str]) -> Tokenizer:
    texts = list(texts)
    if kind == "char":
        return CharTokenizer("".join(sorted(set("".join(texts)))))
    if kind == "byte":
        return ByteTokenizer()
    return BPETokenizer.train(iter(texts), vocab_size or DEFAULT_BPE_VOCAB)


def _encode(tokenizer: Tokenizer, texts: list) -> list:
    return [tokenizer.encode(text, dtype=np.int64) for text in texts]


@dataclass
class BuildResult:
    out: str
    kind: str
    n_train: int
    n_val: int
    detail: str
    seconds: float

    def summary(self) -> str:
        return (f"wrote {self.out}: {self.kind} corpus, {self.n_train:,} train + {self.n_val:,} "
                f"val items; {self.detail} ({self.seconds:.1f} s)")


def _check_common(out: str, overwrite: bool, tokenizer: str, vocab_size: Optional[int],
                  val_fraction: float, max_chars: int, tgt_tokenizer: Optional[str] = None
                  ) -> None:
    kinds = {tokenizer, tgt_tokenizer or tokenizer}
    for kind in sorted(kinds):   # --vocab-size sizes the BPE side; with no BPE it is an error
        check_options(kind, vocab_size if kind == "bpe" or "bpe" not in kinds else None,
                      val_fraction)
    check_output(out, overwrite)
    if max_chars < 1:
        raise UserError(f"--max-chars must be at least 1, got {max_chars}")


def parallel_tokenizers(kind: str, vocab_size: Optional[int], train: list, pairs: list,
                        joint: bool = False, tgt_kind: Optional[str] = None) -> dict:
    """One tokenizer per side (``tgt_kind``: another kind for the target side), or with
    ``joint`` one shared by both (trained on both sides' text: a word the translation
    keeps, such as a program name, has the same ids on both sides). BPE merges are learnt
    from the train split only, so val text never shapes the vocabulary; char
    vocabularies cover every pair, so every val string encodes."""
    tgt_kind = tgt_kind or kind
    if joint:
        if kind != "bpe" or tgt_kind != "bpe":
            raise UserError(f"--joint-vocab needs --tokenizer bpe on both sides (a "
                            f"{kind if kind != 'bpe' else tgt_kind} tokenizer is the same on "
                            f"both sides only by accident)")
        shared = make_tokenizer(kind, vocab_size, (text for p in train for text in p))
        return {"src": shared, "tgt": shared}
    return {side: make_tokenizer(k, vocab_size, (p[i] for p in (train if k == "bpe" else pairs)))
            for i, (side, k) in enumerate((("src", kind), ("tgt", tgt_kind)))}


def build_parallel(out: str, pair: str, mo_root: str = DEFAULT_MO_ROOT, tokenizer: str = "char",
                   vocab_size: Optional[int] = None, val_fraction: float = DEFAULT_VAL_FRACTION,
                   max_chars: int = DEFAULT_MAX_CHARS, overwrite: bool = False,
                   joint_vocab: bool = False, tgt_tokenizer: Optional[str] = None
                   ) -> BuildResult:
    """``tokenizer`` for both sides, or for the source when ``tgt_tokenizer`` is given
    (``--vocab-size`` is then the size of the BPE side(s)); ``joint_vocab``: one BPE."""
    started = time.monotonic()
    src_lang, sep, tgt_lang = pair.partition(":")
    if not sep or not src_lang or not tgt_lang:
        raise UserError(f"--parallel expects SRC:TGT such as en:zh_CN, got {pair!r}")
    _check_common(out, overwrite, tokenizer, vocab_size, val_fraction, max_chars,
                  tgt_tokenizer)
    pairs, stats = collect_pairs(mo_root, src_lang, tgt_lang, max_chars)
    train, val = split_by_hash(pairs, lambda p: p[0], val_fraction)
    toks = parallel_tokenizers(tokenizer, vocab_size, train, pairs, joint_vocab, tgt_tokenizer)
    splits = {}
    for name, part in (("train", train), ("val", val)):
        src, tgt = [p[0] for p in part], [p[1] for p in part]
        splits[name] = SplitItems(tokens={"src": _encode(toks["src"], src),
                                          "tgt": _encode(toks["tgt"], tgt)},
                                  texts={"src": src, "tgt": tgt})
    write_sequence_corpus(out, "parallel", splits, toks, {
        "src_lang": src_lang, "tgt_lang": tgt_lang, "source": f"gettext catalogs under {mo_root}",
        "val_fraction": val_fraction, "max_chars": max_chars})
    if joint_vocab:
        sizes = f"{tokenizer} joint {toks['src'].vocab_size}"
    else:
        sizes = " / ".join(f"{toks[side].kind} {toks[side].vocab_size}" for side in ("src", "tgt"))
    detail = f"en->{tgt_lang} from {stats.describe()}; tokenizers {sizes}"
    return BuildResult(out, "parallel", len(train), len(val), detail,
                       time.monotonic() - started)


def build_langid(out: str, langs: str, mo_root: str = DEFAULT_MO_ROOT, tokenizer: str = "byte",
                 vocab_size: Optional[int] = None, val_fraction: float = DEFAULT_VAL_FRACTION,
                 max_chars: int = DEFAULT_MAX_CHARS, min_letters: int = DEFAULT_MIN_LETTERS,
                 per_language: Optional[int] = None, overwrite: bool = False) -> BuildResult:
    started = time.monotonic()
    names = parse_languages(langs)
    _check_common(out, overwrite, tokenizer, vocab_size, val_fraction, max_chars)
    if per_language is not None and per_language < 1:
        raise UserError(f"--per-language must be at least 1, got {per_language}")
    items, stats, cap = collect_langid(mo_root, names, max_chars, min_letters, per_language)
    train, val = split_by_hash(items, lambda it: it[0], val_fraction)
    tok = make_tokenizer(tokenizer, vocab_size, (it[0] for it in items))
    splits = {}
    for name, part in (("train", train), ("val", val)):
        texts = [it[0] for it in part]
        splits[name] = SplitItems(tokens={"text": _encode(tok, texts)}, texts={"text": texts},
                                  labels=np.array([it[1] for it in part], dtype=np.int32))
    write_sequence_corpus(out, "classification", splits, {"text": tok}, {
        "label_names": json.dumps(names), "task": "language identification",
        "source": f"gettext catalogs under {mo_root}", "val_fraction": val_fraction,
        "max_chars": max_chars, "per_language": cap})
    detail = (f"{len(names)} languages x {cap:,} strings from {stats.describe()}; tokenizer "
              f"{tokenizer} {tok.vocab_size}")
    return BuildResult(out, "classification", len(train), len(val), detail,
                       time.monotonic() - started)

