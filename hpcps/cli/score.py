"""``hpcps score``: evaluate a file of outputs against a file of references."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hpcps import metrics
from hpcps.errors import UserError
from hpcps.metrics.text import check_rouge_types

NAME = "score"
HELP = ("Score outputs against references, one item per line: accuracy, prf1 (precision/"
        "recall/F1), bleu, rouge, or perplexity from per-token negative log-likelihoods.")
EXAMPLE = ("hpcps score --metric bleu --hyp out/hyp.txt --ref data/ref.txt\n"
           "  hpcps score --metric perplexity --hyp out/nll.txt --json")

METRICS = ("accuracy", "prf1", "bleu", "rouge", "perplexity")
TEXT_OPTIONS = {"bleu", "rouge"}


def add_arguments(parser) -> None:
    parser.add_argument("--metric", required=True, choices=METRICS, help="what to compute")
    parser.add_argument("--hyp", required=True, metavar="FILE",
                        help="system outputs, one per line (perplexity: one NLL per token "
                             "per line, or 'NLL_SUM N_TOKENS' per line; natural log)")
    parser.add_argument("--ref", action="append", metavar="FILE",
                        help="references / gold labels, line i for hyp line i; repeat for "
                             "several references (bleu, rouge); not used by perplexity")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tokenize", choices=("13a", "zh", "char", "none"),
                        help="bleu: 13a (default), zh, char or none; rouge: char "
                             "(default: rouge-score's, which drops non-ASCII text)")
    parser.add_argument("--lowercase", action="store_true", help="bleu: case-insensitive")
    parser.add_argument("--average", choices=("macro", "micro", "weighted"), default="macro",
                        help="prf1: how to average over labels (default macro)")
    parser.add_argument("--rouge-types", default="rouge1,rouge2,rougeL", metavar="LIST",
                        help="rouge: comma-separated types, rouge1..rouge9 and rougeL")


def read_items(path: str, role: str) -> list[str]:
    """The lines of ``path`` without their newlines ('\\n' or '\\r\\n'); nothing else stripped."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"{role} file {path} does not exist")
    if file.is_dir():
        raise UserError(f"{role} file {path} is a directory")
    try:
        data = file.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {role} file {path}: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{role} file {path} is not UTF-8 text "
                        f"(bad byte at offset {err.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text:
        raise UserError(f"{role} file {path} is empty")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _check_options(args) -> None:
    metric = args.metric
    if metric == "perplexity":
        if args.ref:
            raise UserError("--metric perplexity reads only --hyp (drop --ref)")
    elif not args.ref:
        raise UserError(f"--metric {metric} needs --ref FILE")
    if metric not in TEXT_OPTIONS and args.tokenize:
        raise UserError("--tokenize applies to --metric bleu and rouge only")
    if args.lowercase and metric != "bleu":
        raise UserError("--lowercase applies to --metric bleu only (rouge always lowercases)")
    if metric == "rouge" and args.tokenize not in (None, "char"):
        raise UserError(f"--metric rouge supports --tokenize char only, got '{args.tokenize}'")
    if metric in ("accuracy", "prf1") and len(args.ref) > 1:
        raise UserError(f"--metric {metric} takes one --ref file of gold labels")
    if metric == "rouge":
        check_rouge_types(_rouge_types(args))


def _rouge_types(args) -> list[str]:
    types = [t.strip() for t in args.rouge_types.split(",") if t.strip()]
    if not types:
        raise UserError("--rouge-types is empty")
    return types


def _load_pairs(args) -> tuple[list[str], list]:
    hyps = read_items(args.hyp, "hyp")
    ref_files = [read_items(path, "ref") for path in args.ref]
    for i, (path, refs) in enumerate(zip(args.ref, ref_files)):
        if len(refs) != len(hyps):
            which = "ref" if len(args.ref) == 1 else f"ref #{i + 1} ({path})"
            raise UserError(f"hyp has {len(hyps)} lines, {which} has {len(refs)}")
    if len(ref_files) == 1:
        return hyps, ref_files[0]
    return hyps, [list(group) for group in zip(*ref_files)]


def compute(args) -> dict:
    """The metric asked for by ``args`` as a JSON-ready dict."""

    _check_options(args)
    if args.metric == "perplexity":
        nll_sum, n_tokens = metrics.nll_from_lines(read_items(args.hyp, "hyp"), source=args.hyp)
        return {"metric": "perplexity", "perplexity": metrics.perplexity(nll_sum, n_tokens),
                "nll_per_token": nll_sum / n_tokens, "nll_sum": nll_sum, "n_tokens": n_tokens}
    hyps, refs = _load_pairs(args)
    result: dict = {"metric": args.metric, "items": len(hyps)}
    if args.metric == "accuracy":
        result["accuracy"] = metrics.accuracy(hyps, refs)
        result["correct"] = sum(h == r for h, r in zip(hyps, refs))
    elif args.metric == "prf1":
        result.update(metrics.precision_recall_f1(hyps, refs, average=args.average))
    elif args.metric == "bleu":
        result["tokenize"] = args.tokenize or "13a"
        result["lowercase"] = args.lowercase
        result.update(metrics.bleu(hyps, refs, tokenize=result["tokenize"],
                                   lowercase=args.lowercase))
    else:
        result["tokenize"] = args.tokenize or "default"
        result.update(metrics.rouge(hyps, refs, types=_rouge_types(args),
                                    tokenize=result["tokenize"]))
    return result


def human_lines(result: dict) -> list[str]:
    metric = result["metric"]
    if metric == "perplexity":
        return [f"perplexity: {result['perplexity']:.4f}",
                f"nll per token: {result['nll_per_token']:.4f}",
                f"tokens: {result['n_tokens']}"]
    lines = []
    if metric == "accuracy":
        lines.append(f"accuracy: {result['accuracy']:.4f} ({result['correct']}/{result['items']})")
    elif metric == "prf1":
        avg = result["average"]
        lines += [f"precision ({avg}): {result['precision']:.4f}",
                  f"recall ({avg}): {result['recall']:.4f}",
                  f"f1 ({avg}): {result['f1']:.4f}"]
        width = max(12, *(len(label) for label in result["per_label"]))
        lines.append(f"{'label':<{width}}  precision  recall      f1  support")
        for label, row in result["per_label"].items():
            lines.append(f"{label:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
                         f"{row['f1']:6.4f}  {row['support']:7d}")
    elif metric == "bleu":
        ratio = result["sys_len"] / result["ref_len"] if result["ref_len"] else 0.0
        lines += [f"BLEU: {result['score']:.2f}",
                  "precisions (1-4 grams): " + " / ".join(f"{p:.1f}" for p in result["precisions"]),
                  f"brevity penalty: {result['bp']:.4f}",
                  f"length ratio: {ratio:.4f} (hyp {result['sys_len']}, ref {result['ref_len']})"]
    else:
        for rouge_type, prf in result.items():
            if isinstance(prf, dict):
                lines.append(f"{rouge_type} F: {prf['f']:.4f}  (P {prf['p']:.4f}, R {prf['r']:.4f})")
    lines.append(f"items: {result['items']}")
    return lines


def run(args) -> int:
    result = compute(args)
    if args.json:
        if not math.isfinite(result.get("perplexity", 0.0)):
            result["perplexity"] = None  # overflowed: JSON has no infinity
        print(json.dumps(result))
    else:
        print("\n".join(human_lines(result)))
    return 0
