"""``hpcps translate``: translate text with a seq2seq checkpoint (beam search)."""

from __future__ import annotations

import json
import sys

from hpcps.backend import get_backend
from hpcps.cli._inputs import add_device_argument, add_input_arguments, int_at_least
from hpcps.inference.checkpoint import input_lines
from hpcps.inference.seq2seq import check_search, load_translator

NAME = "translate"
HELP = ("Translate text with a seq2seq checkpoint: beam search, one translation per input "
        "line (the TEXT arguments, or the lines of --input FILE or standard input).")
EXAMPLE = 'hpcps translate runs/seq2seq_en_zh "Open file" "Permission denied" --beam 4'


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="RUN",
                        help="a seq2seq run directory (its newest checkpoint) or a checkpoint")
    add_input_arguments(parser, "sentence")
    parser.add_argument("--beam", type=int_at_least(1), default=None, metavar="K",
                        help="beam width; 1 = greedy (default: the run's seq2seq.beam)")
    parser.add_argument("--n-best", type=int_at_least(1), default=1, metavar="N",
                        help="the N best translations of each line, best first, as lines "
                             "'LINE<tab>SCORE<tab>TRANSLATION' (at most --beam; default 1)")
    parser.add_argument("--max-len", type=int_at_least(1), default=None,
                        metavar="N", help="stop a translation after N target tokens "
                                          "(default and upper limit: the model's max_tgt_len)")
    parser.add_argument("--length-penalty", type=float, default=None, metavar="A",
                        help="rank by log-prob / ((5 + len) / 6)^A (default: the run's "
                             "seq2seq.length_penalty)")
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per input line: the input and its translations "
                             "with scores (log-prob / length penalty) and log-probs")


def run(args) -> int:
    translator = load_translator(args.checkpoint, backend=get_backend(args.device))
    beam = translator.beam if args.beam is None else args.beam
    check_search(beam, args.n_best, args.max_len)      # before reading any input
    lines = input_lines(args.text, args.input)
    sources = [translator.encode(text, where) for where, text in lines]
    limit = translator.model.max_src_len - 1
    for (where, _), ids in zip(lines, sources):
        if len(ids) > limit and not args.quiet:
            print(f"hpcps: note: {where} is {len(ids)} tokens; the model reads the first "
                  f"{limit}", file=sys.stderr)
    found = translator.translate(sources, beam, args.n_best, args.max_len, args.length_penalty)
    for number, ((_, text), hyps) in enumerate(zip(lines, found), start=1):
        if args.json:
            print(json.dumps({"input": text, "translations": [
                {"text": t, "score": score, "log_prob": logp} for t, score, logp in hyps]},
                ensure_ascii=False))
        elif args.n_best == 1:
            print(hyps[0][0])
        else:       # N lines per input: its number, the score, the translation
            for t, score, _ in hyps:
                print(f"{number}\t{score:.4f}\t{t}")
    return 0
