"""``hpcps sample``: generate text from a GPT checkpoint."""

from __future__ import annotations

import math
import sys

from hpcps.backend import get_backend
from hpcps.cli._inputs import add_device_argument, int_at_least
from hpcps.errors import UserError
from hpcps.inference.gpt import generate, load_gpt

NAME = "sample"
HELP = ("Generate text from a GPT checkpoint with the tokenizer saved in it (temperature, "
        "top-k; temperature 0 is greedy).")
EXAMPLE = ('hpcps sample runs/default --prompt "def " --max-new-tokens 200 --temperature 0.8 '
           "--top-k 40 --seed 1")

SEPARATOR = "-" * 40   # printed between samples when there are several


def _temperature(text: str) -> float:
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("--prompt", default="\n", metavar="TEXT",
                        help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int_at_least(0), default=200, metavar="N",
                        help="tokens to generate after the prompt (default 200)")
    parser.add_argument("--temperature", type=_temperature, default=0.8, metavar="T",
                        help="divide the logits by T before sampling; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int_at_least(0), default=200, metavar="K",
                        help="sample among the K most likely tokens; 0 = all (default 200)")
    parser.add_argument("--seed", type=int_at_least(0), default=1337, metavar="S",
                        help="random seed: the same seed gives the same text (default 1337)")
    parser.add_argument("--num-samples", type=int_at_least(1), default=1, metavar="N",
                        help="independent samples, separated by a line of '-' (default 1)")
    add_device_argument(parser)


def run(args) -> int:
    loaded = load_gpt(args.checkpoint, backend=get_backend(args.device), purpose="hpcps sample")
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"checkpoint {loaded.checkpoint.path} has no tokenizer to encode the "
                        f"prompt")
    try:
        prompt_ids = tokenizer.encode(args.prompt)
    except UserError as err:
        raise UserError(f"the prompt cannot be encoded by the checkpoint's {tokenizer.kind} "
                        f"tokenizer: {err}") from None
    ids = generate(loaded.model, loaded.params, prompt_ids, args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k or None,
                   num_samples=args.num_samples, seed=args.seed)
    for i, row in enumerate(ids):
        if i:
            print(SEPARATOR)
        text = tokenizer.decode(row)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
    return 0
