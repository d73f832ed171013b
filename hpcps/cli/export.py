"""``hpcps export``: a checkpoint as a Hugging Face GPT-2 directory or a NumPy .npz."""

from __future__ import annotations

from hpcps.export import export_checkpoint
from hpcps.runtime.files import check_writable

NAME = "export"
HELP = ("Export a checkpoint: hf-gpt2 (a directory transformers.GPT2LMHeadModel loads; GPT "
        "only) or npz (every named tensor plus the config as JSON; any workload).")
EXAMPLE = "hpcps export runs/default --format hf-gpt2 -o exported/default-gpt2"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("--format", required=True, choices=("hf-gpt2", "npz"),
                        help="hf-gpt2: model.safetensors + config.json + tokenizer + README in "
                             "a directory; npz: one .npz file")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="hf-gpt2: the directory to create; npz: the file ('.npz' is "
                             "appended when missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    check_writable(args.output)
    result = export_checkpoint(args.checkpoint, args.format, args.output, args.overwrite)
    what = "files" if args.format == "hf-gpt2" else "arrays"
    print(f"wrote {result.path}: {len(result.files)} {what} from checkpoint step {result.step} "
          f"({result.checkpoint})")
    return 0
