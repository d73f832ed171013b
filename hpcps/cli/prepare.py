"""``hpcps prepare``: tokenize text into an HDF5 corpus (see docs/corpus-format.md)."""

from __future__ import annotations

NAME = "prepare"
HELP = "Tokenize text files into an HDF5 token corpus (train/val splits)."
EXAMPLE = "hpcps prepare shakespeare.txt -o shakespeare.h5 --tokenizer char"


def _fraction(text: str) -> float:
    import argparse
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="text files, directories (recursive, sorted, binary files skipped), "
                             "globs (expanded here, sorted), or 'default' for the built-in "
                             "offline corpus (use ./default for a file of that name)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.h5",
                        help="corpus file to write")
    parser.add_argument("--tokenizer", choices=("char", "byte", "bpe"), default="char",
                        help="char: nanoGPT characters; byte: UTF-8 bytes (any input); "
                             "bpe: byte-level BPE trained on the input (default: char)")
    parser.add_argument("--vocab-size", type=int, default=None, metavar="N",
                        help="bpe vocabulary size (default 4096); an error for char and byte")
    parser.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F",
                        help="last fraction F of the token stream is the val split "
                             "(default 0.1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT.h5 if it exists")
    parser.add_argument("--default-corpus", action="store_true",
                        help="add the built-in corpus (same as the INPUT 'default')")


def run(args) -> int:
    from hpcps.data.prepare import prepare
    result = prepare(args.inputs, args.output, tokenizer=args.tokenizer,
                     vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                     overwrite=args.overwrite, quiet=getattr(args, "quiet", False),
                     default_corpus=args.default_corpus)
    print(result.summary())
    return 0
