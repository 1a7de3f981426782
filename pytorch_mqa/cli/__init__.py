"""The `pytorch-mqa` command line (also `python -m pytorch_mqa`), the top layer.

Each subcommand is a module of this package with `add_arguments(parser)` and `run(args)`; this
file wires them together and is the one error boundary: whatever a command raises is printed as
`pytorch-mqa CMD: error: WHERE: WHAT` on one line (exit 2 for a bad command line, 1 otherwise),
with the traceback only under --debug.
"""

from __future__ import annotations

import argparse
import sys

from pytorch_mqa.cli import bench, check, finetune, generate, info, study, train
from pytorch_mqa.cli.common import error_line

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


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: `pytorch-mqa CMD: error: ...`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where its help already says it (or it is a plain switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pytorch-mqa", description="Fused MQA/GQA attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv  # for the command that resumes an interrupted run
    try:
        return int(COMMANDS[args.command][0].run(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        if args.debug:
            raise
        code, line = error_line(err)
        print(f"pytorch-mqa {args.command}: error: {line}", file=sys.stderr, flush=True)
        return code


__all__ = ["main", "build_parser", "COMMANDS"]
