"""``hpcps classify``: label text with a classifier (rnn) checkpoint."""

from __future__ import annotations

import json

from hpcps.backend import get_backend
from hpcps.cli._inputs import add_device_argument, add_input_arguments, int_at_least
from hpcps.inference.checkpoint import input_lines
from hpcps.inference.classifier import load_classifier

NAME = "classify"
HELP = ("Label text with a classifier checkpoint (workload rnn): the most probable label and "
        "its probability per input line (the TEXT arguments, or the lines of --input FILE or "
        "standard input).")
EXAMPLE = 'hpcps classify runs/rnn_langid "Datei öffnen" "Ouvrir le fichier" --top-k 3'


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="RUN",
                        help="an rnn run directory (its newest checkpoint) or a checkpoint")
    add_input_arguments(parser, "string")
    parser.add_argument("--top-k", type=int_at_least(1), default=1, metavar="K",
                        help="show the K most probable labels of each line (default 1)")
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per input line: the input and its labels with "
                             "probabilities")


def run(args) -> int:
    classifier = load_classifier(args.checkpoint, backend=get_backend(args.device))
    lines = input_lines(args.text, args.input)
    ids = [classifier.encode(text, where) for where, text in lines]
    for (_, text), top in zip(lines, classifier.top_labels(ids, args.top_k)):
        if args.json:
            print(json.dumps({"input": text, "labels": [{"label": label, "probability": p}
                                                        for label, p in top]},
                             ensure_ascii=False))
        else:       # LABEL<tab>PROBABILITY[<tab>LABEL<tab>PROBABILITY ...]
            print("\t".join(f"{label}\t{p:.4f}" for label, p in top))
    return 0
