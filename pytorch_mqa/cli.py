"""`pytorch-mqa` command line (also `python -m pytorch_mqa`).

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args)`;
this file only wires them together, importing a module when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "info": ("pytorch_mqa.info", "versions, devices and which backends this machine has"),
    "train": ("pytorch_mqa.train", "train a GPT (MHA/GQA/MQA) on a text corpus"),
    "generate": ("pytorch_mqa.generate_cli", "generate text from a checkpoint or Hugging Face GPT-2 directory"),
    "study": ("pytorch_mqa.study", "MHA vs GQA vs MQA quality/speed study with a Markdown report"),
    "finetune": ("pytorch_mqa.finetune", "instruction fine-tuning in the Alpaca format"),
    "bench": ("pytorch_mqa.bench", "microbenchmarks of both ops and end-to-end generation tokens/s"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytorch-mqa", description="Fused MQA/GQA attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
