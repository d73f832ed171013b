"""``hpcps fill-mask``: the most probable tokens for each [MASK] with a BERT checkpoint."""

from __future__ import annotations

import json

from hpcps.backend import get_backend
from hpcps.cli._inputs import add_device_argument, add_input_arguments, int_at_least
from hpcps.inference.checkpoint import input_lines
from hpcps.inference.mlm import MASK_TEXT, load_masked_lm

NAME = "fill-mask"
HELP = ("Fill each [MASK] in text with a BERT (masked LM) checkpoint: the top-k tokens with "
        "their probabilities per mask (one [MASK] is one token of the checkpoint's tokenizer).")
EXAMPLE = 'hpcps fill-mask runs/bert_mlm "To be, or not to b[MASK]" --top-k 5'


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="RUN",
                        help="a bert run directory (its newest checkpoint) or a checkpoint")
    add_input_arguments(parser, "text with [MASK]")
    parser.add_argument("--top-k", type=int_at_least(1), default=5, metavar="K",
                        help="fillers shown per mask (default 5)")
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per input line: the text with the best fillers "
                             "and, per mask, the fillers with probabilities")


def run(args) -> int:
    loaded = load_masked_lm(args.checkpoint, backend=get_backend(args.device))
    lines = input_lines(args.text, args.input)
    encoded = [loaded.encode_masked(text, where) for where, text in lines]
    for (_, text), ids in zip(lines, encoded):
        masks = loaded.fill(ids, args.top_k)
        pieces = text.split(MASK_TEXT)
        filled = pieces[0] + "".join(fillers[0][0] + piece
                                     for fillers, piece in zip(masks, pieces[1:]))
        # the text form keeps one line per input: a newline or tab filler is shown escaped
        shown_filled = pieces[0] + "".join(_visible(fillers[0][0]) + piece
                                           for fillers, piece in zip(masks, pieces[1:]))
        if args.json:
            print(json.dumps({"input": text, "filled": filled, "masks": [
                [{"token": token, "probability": p} for token, p in fillers]
                for fillers in masks]}, ensure_ascii=False))
            continue
        print(shown_filled)
        for number, fillers in enumerate(masks, start=1):
            shown = "  ".join(f"{json.dumps(token, ensure_ascii=False)} {p:.4f}"
                              for token, p in fillers)
            print(f"  {MASK_TEXT} {number}: {shown}")
    return 0


def _visible(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
