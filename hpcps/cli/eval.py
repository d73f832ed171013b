"""``hpcps eval``: a checkpoint's own metrics on a corpus split, for every workload."""

from __future__ import annotations

import json
import math

from hpcps.backend import get_backend
from hpcps.checkpoint import open_checkpoint
from hpcps.cli._inputs import add_device_argument, int_at_least
from hpcps.data.progress import Progress
from hpcps.errors import UserError
from hpcps.inference import classifier as cls
from hpcps.inference import mlm, seq2seq, skipgram
from hpcps.inference.checkpoint import COMMANDS, checkpoint_workload, open_lm_corpus
from hpcps.inference.gpt import load_gpt, loss_over_tokens

NAME = "eval"
HELP = ("Evaluate a checkpoint on a corpus split with its workload's metrics: GPT loss and "
        "perplexity; BERT masked loss and accuracy; seq2seq loss, BLEU and chrF with the copy "
        "baseline; classifier accuracy, macro P/R/F1 and confusion matrix; skip-gram loss "
        "and pair accuracy.")
EXAMPLE = "hpcps eval runs/default --data data/default.h5 --split val --json"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="corpus written by `hpcps prepare` with the checkpoint's tokenizer")
    parser.add_argument("--split", choices=("train", "val"), default="val",
                        help="which split to evaluate (default val)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16, metavar="N",
                        help="windows or pairs per forward pass (default 16)")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=None, metavar="N",
                        help="gpt, bert: evaluate only the first N tokens of the split (gpt: "
                             "N predicted tokens; default: the whole split)")
    parser.add_argument("--max-items", type=int_at_least(1), default=None, metavar="N",
                        help="seq2seq, rnn, skipgram: evaluate only the first N pairs / strings "
                             "/ center-context pairs (default: the whole split)")
    parser.add_argument("--beam", type=int_at_least(1), default=None, metavar="K",
                        help="seq2seq: beam width (default: the run's seq2seq.beam)")
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# which size option each workload reads (the other one is an error, not silently ignored)
SIZE_OPTION = {"gpt": "max_tokens", "bert": "max_tokens", "seq2seq": "max_items",
               "rnn": "max_items", "skipgram": "max_items"}


def check_corpus_matches(loaded, corpus, data_path: str) -> None:
    """The corpus must be tokenized exactly as the checkpoint's training corpus was."""
    import hashlib

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


def _eval_gpt(args, ck, backend) -> tuple[dict, str]:

    loaded = load_gpt(ck, backend=backend, purpose="hpcps eval")
    with open_lm_corpus(args.data, "GPT") as corpus:
        check_corpus_matches(loaded, corpus, args.data)
        split = corpus.split(args.split)
        n_tokens = split.n_tokens
        if args.max_tokens is not None:
            n_tokens = min(n_tokens, args.max_tokens + 1)   # N predicted tokens need N + 1
        if n_tokens < 2:
            raise UserError(f"corpus {args.data}: the {args.split} split has one token, too few "
                            f"to evaluate")
        with Progress(n_tokens - 1, f"eval {args.split}", quiet=args.quiet, unit="tok") as bar:
            nll_sum, count = loss_over_tokens(loaded.model, loaded.params, split.read, n_tokens,
                                              args.batch_size, bar.update)
    loss = nll_sum / count
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    return result, (f"loss {loss:.4f} | perplexity {result['perplexity']:.3f} | {count:,} tokens")


def _eval_bert(args, ck, backend) -> tuple[dict, str]:
    loaded = mlm.load_masked_lm(ck, backend=backend, purpose="hpcps eval")
    with mlm.open_lm(loaded, args.data) as corpus:
        n = corpus.split(args.split).n_tokens
        n = n if args.max_tokens is None else min(n, args.max_tokens)
        with Progress(n, f"eval {args.split}", quiet=args.quiet, unit="tok") as bar:
            r = mlm.evaluate(loaded, corpus, args.split, args.max_tokens, args.batch_size,
                             bar.update)
    return r, (f"masked loss {r['loss']:.4f} | perplexity {r['perplexity']:.3f} | masked accuracy "
               f"{r['accuracy']:.4f} (unigram baseline {r['unigram_accuracy']:.4f}) | "
               f"{r['masked_tokens']:,} masked of {r['tokens']:,} tokens")


def _eval_seq2seq(args, ck, backend) -> tuple[dict, str]:
    translator = seq2seq.load_translator(ck, backend=backend, purpose="hpcps eval")
    beam = translator.beam if args.beam is None else args.beam
    with seq2seq.open_parallel(translator, args.data) as corpus:
        n = corpus.split(args.split).n
        n = n if args.max_items is None else min(n, args.max_items)
        with Progress(n, f"translate {args.split}", quiet=args.quiet, unit="pairs") as bar:
            r = seq2seq.evaluate(translator, corpus, args.split, args.max_items, beam,
                                 args.batch_size, bar.update)
    return r, (f"BLEU {r['bleu']:.2f} (copy baseline {r['copy_bleu']:.2f}) | chrF "
               f"{r['chrf']:.2f} (copy {r['copy_chrf']:.2f}) | loss {r['loss']:.4f} | "
               f"{r['pairs']:,} pairs, beam {beam}")


def _eval_rnn(args, ck, backend) -> tuple[dict, str]:
    loaded = cls.load_classifier(ck, backend=backend, purpose="hpcps eval")
    with cls.open_classification(loaded, args.data) as corpus:
        n = corpus.split(args.split).n
        n = n if args.max_items is None else min(n, args.max_items)
        with Progress(n, f"classify {args.split}", quiet=args.quiet, unit="strings") as bar:
            r = cls.evaluate(loaded, corpus, args.split, args.max_items, bar.update)
    lines = [f"accuracy {r['accuracy']:.4f} (majority baseline {r['majority_accuracy']:.4f}) | "
             f"macro precision {r['precision_macro']:.4f} recall {r['recall_macro']:.4f} F1 "
             f"{r['f1_macro']:.4f} | loss {r['loss']:.4f} | {r['items']:,} strings",
             confusion_table(r["labels"], r["confusion"])]
    return r, "\n".join(lines)


def _eval_skipgram(args, ck, backend) -> tuple[dict, str]:
    workload, params, _ = skipgram.load_skipgram_eval(ck, args.data, backend)
    n = workload.sampler(args.split).n
    n = n if args.max_items is None else min(n, args.max_items)
    with Progress(n, f"eval {args.split}", quiet=args.quiet, unit="pairs") as bar:
        r = skipgram.evaluate(workload, params, args.split, args.max_items, bar.update)
    workload.corpus.close()
    return r, (f"loss {r['loss']:.4f} | pair accuracy {r['pair_accuracy']:.4f} (chance "
               f"{r['chance']:.4f}) | {r['pairs']:,} pairs")


EVALUATORS = {"gpt": _eval_gpt, "bert": _eval_bert, "seq2seq": _eval_seq2seq,
              "rnn": _eval_rnn, "skipgram": _eval_skipgram}


def confusion_table(labels: list, matrix: list) -> str:
    """Rows gold, columns predicted, right-aligned under the label names."""
    width = max([len(str(v)) for row in matrix for v in row] + [len(x) for x in labels])
    head = " " * (width + 1) + " ".join(f"{x:>{width}}" for x in labels) + "  <- predicted"
    rows = [f"{g:>{width}} " + " ".join(f"{v:>{width}}" for v in row)
            for g, row in zip(labels, matrix)]
    return "\n".join([head] + rows)


def run(args) -> int:
    ck = open_checkpoint(args.checkpoint)
    workload = checkpoint_workload(ck)
    if workload not in EVALUATORS:
        raise UserError(f"hpcps eval does not know workload '{workload}' of checkpoint {ck.path} "
                        f"(it evaluates {', '.join(sorted(COMMANDS))})")
    wanted = SIZE_OPTION[workload]
    for option in ("max_tokens", "max_items"):
        if option != wanted and getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} does not apply to a {workload} checkpoint; use "
                            f"--{wanted.replace('_', '-')}")
    if args.beam is not None and workload != "seq2seq":
        raise UserError(f"--beam applies to seq2seq checkpoints; {ck.path} holds '{workload}'")
    result, text = EVALUATORS[workload](args, ck, get_backend(args.device))
    result.update(workload=workload, split=args.split, data=args.data, checkpoint=ck.path,
                  step=ck.step)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        first, _, rest = text.partition("\n")
        print(f"{first} ({args.split} split of {args.data}) | checkpoint step {ck.step}")
        if rest:
            print(rest)
    return 0
