"""``hpcps inspect``: summarize and validate a corpus written by ``hpcps prepare``."""

from __future__ import annotations

NAME = "inspect"
HELP = "Summarize and validate an HDF5 token corpus (checksums, token range, documents)."
EXAMPLE = "hpcps inspect shakespeare.h5 --json"

_SHOWN_DOCUMENTS = 3


def add_arguments(parser) -> None:
    parser.add_argument("file", metavar="FILE", help="corpus written by `hpcps prepare`")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reading every chunk (checksums, token range, ids < vocab)")


def summarize(corpus, verify: bool) -> dict:
    """Everything ``inspect`` reports; runs the full verification when ``verify``."""
    stats = corpus.verify() if verify else None
    splits = {}
    for name in ("train", "val"):
        split = corpus.split(name)
        info = stats[name] if stats else {k: split.attrs.get(k) for k in
                                          ("n_tokens", "min_token", "max_token", "sha256")}
        splits[name] = {**info, "n_tokens": split.n_tokens}
    docs = corpus.documents()
    attrs = corpus.attrs
    return {
        "file": corpus.path,
        "format": attrs.get("format"),
        "format_version": corpus.format_version,
        "created_by": attrs.get("created_by"),
        "kind": corpus.kind,
        "tokenizer": corpus.tokenizer_kind,
        "vocab_size": corpus.vocab_size,
        "token_dtype": corpus.token_dtype.name,
        "val_fraction": attrs.get("val_fraction"),
        "eot_token": attrs.get("eot_token"),
        "text_field": attrs.get("text_field"),
        "n_parts": attrs.get("n_parts"),
        "splits": splits,
        "documents": {"count": len(docs), "bytes": sum(d["n_bytes"] for d in docs),
                      "names": [d["name"] for d in docs[:_SHOWN_DOCUMENTS]]},
        "checksums": "ok" if verify else "not verified",
    }


def _short(digest) -> str:
    return f"{digest[:16]}..." if isinstance(digest, str) else "?"


def format_text(info: dict) -> str:
    lines = [
        ("corpus", info["file"]),
        ("format", f"{info['format']} v{info['format_version']}, created by {info['created_by']}"),
        ("kind", info["kind"]),
        ("tokenizer", f"{info['tokenizer']}, vocab_size {info['vocab_size']}, "
                      f"token_dtype {info['token_dtype']}"
                      + (f", end-of-text id {info['eot_token']} after every document"
                         if info["eot_token"] is not None else "")),
    ]
    if info["n_parts"]:
        lines.append(("parts", f"{info['n_parts']} part file(s) in {info['file']}.parts/ "
                               f"(written by a parallel prepare)"))
    for name, split in info["splits"].items():
        lines.append((name, f"{split['n_tokens']:,} tokens, ids {split['min_token']}.."
                            f"{split['max_token']}, sha256 {_short(split['sha256'])}"))
    docs = info["documents"]
    names = ", ".join(docs["names"])
    more = docs["count"] - len(docs["names"])
    lines.append(("documents", f"{docs['count']:,} ({docs['bytes']:,} bytes)"
                               + (f": {names}" if names else "")
                               + (f" and {more:,} more" if more > 0 else "")))
    lines.append(("checksums", "ok (every chunk read: fletcher32, sha256, token range, "
                               "ids < vocab_size)" if info["checksums"] == "ok"
                  else "not verified (--no-verify)"))
    return "\n".join(f"{key:<11}{value}" for key, value in lines)


def run(args) -> int:
    import json

    # imported when the command runs, so that `hpcps --help` stays fast
    from hpcps.data.corpus import Corpus
    with Corpus.open(args.file) as corpus:
        info = summarize(corpus, verify=not args.no_verify)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
