"""``hpcps import``: a pretrained Hugging Face GPT-2 directory as an hpcps run directory."""

from __future__ import annotations

from hpcps.importer import FORMATS, import_model
from hpcps.runtime.files import check_writable

NAME = "import"
HELP = ("Import a pretrained model: hf-gpt2 reads a GPT2LMHeadModel directory (config.json, "
        "model.safetensors or its shards, tokenizer.json or vocab.json + merges.txt) into a run "
        "directory that hpcps eval / sample / export use and train.init_from starts from.")
EXAMPLE = "hpcps import gpt2/ --format hf-gpt2 -o runs/gpt2"


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="DIR", help="the model directory (safetensors weights)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="hf-gpt2: a Hugging Face GPT2LMHeadModel directory")
    parser.add_argument("-o", "--output", required=True, metavar="RUN",
                        help="the run directory to create")
    parser.add_argument("--eot-token", default=None, metavar="TOKEN",
                        help="the tokenizer's end-of-text token (default: the first of "
                             "<|endoftext|>, </s>, ... it defines), as in hpcps prepare")
    parser.add_argument("--overwrite", action="store_true", help="replace RUN if it exists")


def run(args) -> int:
    check_writable(args.output)
    r = import_model(args.source, args.format, args.output, args.overwrite, args.eot_token)
    eot = f" --eot-token '{r.eot}'" if args.eot_token else ""
    print(f"imported {args.source} ({r.weights}): GPT-2, {r.model}, {r.n_params:,} params -> "
          f"{r.run_dir} (checkpoint {r.checkpoint})")
    print(f"tokenizer: {r.tokenizer_file} (from {r.tokenizer_source}); a corpus for this model:")
    print(f"  hpcps prepare TEXT_FILES --tokenizer-file {r.tokenizer_file}{eot} -o CORPUS.h5")
    print(f"then: hpcps eval {r.run_dir} --data CORPUS.h5, hpcps sample {r.run_dir} --prompt "
          f"TEXT, or fine-tune: hpcps train CONFIG train.init_from={r.run_dir} "
          f"data.path=CORPUS.h5")
    return 0
