"""The ``vidmoe`` command: a thin dispatcher over library functions.

Each subcommand lives in the module that does the work, as two functions:
``add_arguments(parser)`` and ``main(args) -> int``. Only the chosen command's module is
imported, so ``vidmoe --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UsageError

COMMANDS = {
    "train": ("vidmoe.train", "train a model from a config"),
    "generate": ("vidmoe.generate", "generate clips from a trained model to video files"),
    "inspect": ("vidmoe.analysis.inspect", "report what each expert learned to do"),
    "eval": ("vidmoe.evaluate", "held-out loss and physics metrics of a trained model"),
    "bench": ("vidmoe.bench", "speed of the MoE layer, training step and generation, side by side"),
    "prepare": ("vidmoe.data.prepare", "write synthetic clips to a folder, or decode a folder into a cache"),
    "demo": ("vidmoe.demo", "train, generate and inspect at a small size on built-in data"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidmoe",
        description="Spatiotemporal Mixture-of-Experts diffusion transformers for video.",
        epilog="Run 'vidmoe COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                        help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        parser.parse_args(argv[:1])  # prints the usage error and exits with 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"vidmoe {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UsageError as err:
        print(f"vidmoe {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vidmoe {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
