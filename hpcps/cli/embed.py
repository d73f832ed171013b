"""``hpcps embed``: export a skip-gram checkpoint's vectors in word2vec text format."""

from __future__ import annotations

import os

import numpy as np

from hpcps.checkpoint import open_checkpoint
from hpcps.data.corpus import Corpus
from hpcps.data.tokenizer import Tokenizer
from hpcps.errors import UserError
from hpcps.model.skipgram import build_layout, cosine_neighbours

NAME = "embed"
HELP = ("Write the token vectors of a skip-gram checkpoint in word2vec text format and print "
        "cosine nearest neighbours.")
EXAMPLE = "hpcps embed runs/skipgram -o vectors.txt --neighbours ' king' ' love'"

DEFAULT_QUERIES = 5            # frequent tokens shown when no --neighbours are given
_ESCAPES = {" ": "\u2581", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint directory, a checkpoint.dir or a run directory "
                             "(its newest checkpoint)")
    parser.add_argument("-o", "--output", required=True, metavar="vectors.txt",
                        help="word2vec text file to write: 'V d', then 'token v1 ... vd' per line")
    parser.add_argument("--neighbours", nargs="+", metavar="WORD", default=None,
                        help="print the nearest tokens of these (a token as written in the "
                             "file, or text that is exactly one token); default: the "
                             f"{DEFAULT_QUERIES} most frequent tokens of the training corpus")
    parser.add_argument("--top", type=int, default=8, metavar="N",
                        help="neighbours printed per word (default 8)")


def token_name(tokenizer, token_id: int) -> str:
    """A whitespace-free, printable name for a token: spaces as U+2581, newlines as \\n,
    undecodable pieces (a lone byte of a multi-byte character) as <ID>."""
    if tokenizer is None:
        return f"<{token_id}>"
    if tokenizer.kind == "byte":
        text = chr(token_id) if token_id < 128 else ""
    else:
        text = tokenizer.decode([token_id])
    if not text or "\ufffd" in text:
        return f"<{token_id}>"
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable() or ch.isspace():
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def token_names(tokenizer, vocab_size: int) -> list[str]:
    names, seen = [], set()
    for i in range(vocab_size):
        name = token_name(tokenizer, i)
        if name in seen:
            name = f"{name}#{i}"
        seen.add(name)
        names.append(name)
    return names


def write_word2vec(path: str, names: list, vectors) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{vectors.shape[0]} {vectors.shape[1]}\n")
            for name, row in zip(names, vectors):
                fh.write(name + " " + " ".join(f"{x:.6g}" for x in row) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def _corpus_counts(cfg, vocab_size: int):
    """Train-split token counts of the run's corpus, or None when it is not readable here."""
    if not cfg.data.path:
        return None
    try:
        with Corpus.open(cfg.data.path) as corpus:
            if corpus.vocab_size != vocab_size:
                return None
            return np.bincount(corpus.split("train").load(), minlength=vocab_size)
    except UserError:
        return None


def _lookup(word: str, names: list, tokenizer) -> int:
    if word in names:
        return names.index(word)
    if tokenizer is not None:
        try:
            ids = tokenizer.encode(word)
        except UserError:
            ids = []
        if len(ids) == 1:
            return int(ids[0])
        if len(ids) > 1:
            raise UserError(f"--neighbours: {word!r} is {len(ids)} tokens, not one; give a "
                            "single token (as named in the vectors file)")
    raise UserError(f"--neighbours: {word!r} is not a token of this vocabulary")


def run(args) -> int:
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    reader = open_checkpoint(args.checkpoint)
    cfg = reader.config
    if cfg.workload != "skipgram":
        raise UserError(f"checkpoint {reader.path} is a '{cfg.workload}' run; `hpcps embed` "
                        "reads skip-gram checkpoints")
    described = reader.manifest.get("describe", {})
    vocab, dim = int(described.get("vocab_size", 0)), int(described.get("dim", cfg.skipgram.dim))
    layout = build_layout(vocab, dim) if vocab > 0 else None
    if layout is None or layout.total != reader.n_params:
        raise UserError(f"checkpoint {reader.path}: {reader.n_params} parameters do not match "
                        f"a skip-gram model of vocab {vocab} x dim {dim}")
    spec = reader.tokenizer_json()
    tokenizer = Tokenizer.from_json(spec) if spec else None
    vectors = layout.views(reader.params())["emb_in"]
    names = token_names(tokenizer, vocab)
    queries = [_lookup(word, names, tokenizer) for word in args.neighbours or ()]
    write_word2vec(args.output, names, vectors)
    print(f"wrote {args.output}: {vocab} vectors of {dim} from {reader.path} (step {reader.step})")
    counts = _corpus_counts(cfg, vocab)
    allowed = counts > 0 if counts is not None else None
    if not queries and counts is not None:
        queries = [int(i) for i in np.argsort(-counts, kind="stable")[:DEFAULT_QUERIES]]
    elif not queries:
        print("(corpus not readable here: give --neighbours WORD ... to see neighbours)")
        return 0
    for q in queries:
        found = cosine_neighbours(np.asarray(vectors, dtype=np.float64), q, args.top, allowed)
        shown = ", ".join(f"{names[i]} {sim:.3f}" for i, sim in found)
        print(f"{names[q]}: {shown}")
    return 0
