"""The `pytorch-mqa` command line (also `python -m pytorch_mqa`), the top layer.

Each subcommand is a module of this package with `add_arguments(parser)` and `run(args)`; this
file wires them together.
"""

from __future__ import annotations

import argparse
import sys

from pytorch_mqa.cli import bench, check, finetune, generate, info, study, train

# command -> (module, one-line help)
COMMANDS = {
    "info": (info, "versions, devices and which backends this machine has"),
    "train": (train, "train a GPT (MHA/GQA/MQA) on a text corpus"),
    "generate": (generate, "generate text from a checkpoint or Hugging Face GPT-2 directory"),
    "study": (study, "MHA vs GQA vs MQA quality/speed study with a Markdown report"),
    "finetune": (finetune, "instruction fine-tuning in the Alpaca format"),
    "bench": (bench, "microbenchmarks of both ops and end-to-end generation tokens/s"),
    "check": (check, "check an attention kernel or a backend against the oracle (DESIGN §5)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytorch-mqa", description="Fused MQA/GQA attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(COMMANDS[args.command][0].run(args) or 0)


__all__ = ["main", "build_parser", "COMMANDS"]
