"""``hpcps eval``: loss and perplexity of a checkpoint on a corpus split."""

from __future__ import annotations

NAME = "eval"
HELP = ("Evaluate a GPT checkpoint on a corpus split: mean loss (nats per token) and perplexity "
        "over non-overlapping windows of block_size.")
EXAMPLE = "hpcps eval runs/default --data data/default.h5 --split val --json"


def _positive_int(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="corpus written by `hpcps prepare` with the checkpoint's tokenizer")
    parser.add_argument("--split", choices=("train", "val"), default="val",
                        help="which split to evaluate (default val)")
    parser.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                        help="windows per forward pass (default 16)")
    parser.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                        help="evaluate only the first N predicted tokens "
                             "(default: the whole split)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="run the model with NumPy (cpu, default) or CuPy (gpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def check_corpus_matches(loaded, corpus, data_path: str) -> None:
    """The corpus must be tokenized exactly as the checkpoint's training corpus was."""
    import hashlib

    from hpcps.errors import UserError
    if corpus.kind != "lm":
        raise UserError(f"corpus {data_path} is a '{corpus.kind}' corpus; eval needs a language-"
                        f"model corpus (prepared from text files)")
    tok = corpus.tokenizer
    ck_tok = loaded.tokenizer
    ck_desc = (f"{ck_tok.kind} vocab {ck_tok.vocab_size}" if ck_tok is not None
               else f"vocab {loaded.model.vocab_size}")
    here = f"{tok.kind} vocab {tok.vocab_size}"
    if tok.vocab_size != loaded.model.vocab_size:
        raise UserError(f"corpus {data_path} has a {here} tokenizer but checkpoint "
                        f"{loaded.checkpoint.path} was trained with {ck_desc}")
    sha = hashlib.sha256(tok.to_json().encode()).hexdigest()
    if sha != loaded.tokenizer_sha256:
        raise UserError(f"corpus {data_path} was tokenized differently from checkpoint "
                        f"{loaded.checkpoint.path} (same size, {here}, but tokenizer sha256 "
                        f"{sha[:12]} != {loaded.tokenizer_sha256[:12]}): prepare it with the "
                        f"checkpoint's tokenizer")


def run(args) -> int:
    import json
    import math

    from hpcps.backend import get_backend
    from hpcps.data.corpus import Corpus
    from hpcps.data.progress import Progress
    from hpcps.inference.gpt import load_gpt, loss_over_tokens

    loaded = load_gpt(args.checkpoint, backend=get_backend(args.device), purpose="hpcps eval")
    with Corpus.open(args.data) as corpus:
        check_corpus_matches(loaded, corpus, args.data)
        split = corpus.split(args.split)
        n_tokens = split.n_tokens
        if args.max_tokens is not None:
            n_tokens = min(n_tokens, args.max_tokens + 1)   # N predicted tokens need N + 1
        if n_tokens < 2:
            from hpcps.errors import UserError
            raise UserError(f"corpus {args.data}: the {args.split} split has one token, too few "
                            f"to evaluate")
        with Progress(n_tokens - 1, f"eval {args.split}", quiet=args.quiet, unit="tok") as bar:
            nll_sum, count = loss_over_tokens(loaded.model, loaded.params, split.read, n_tokens,
                                              args.batch_size, bar.update)
    loss = nll_sum / count
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count,
              "split": args.split, "data": args.data, "checkpoint": loaded.checkpoint.path,
              "step": loaded.step}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {loss:.4f} | perplexity {result['perplexity']:.3f} | {count:,} tokens "
              f"({args.split} split of {args.data}) | checkpoint step {loaded.step}")
    return 0

