"""The `vitsweep` command: `vitsweep <subcommand> [args...]`, each subcommand a module with main(argv)."""

from __future__ import annotations

import importlib
import os
import sys

# imported only when called, so `vitsweep --help` does not pay for matplotlib or torch
SUBCOMMANDS = {
    "compare": ("vitsweep.compare", "compare runs: table, comparison.csv, comparison.png"),
    "sweeps": ("vitsweep.sweep_files", "write sweeps/*.yaml (W&B) from the ablations and searches in conf/; --check"),
}


def usage() -> str:
    lines = ["usage: vitsweep <subcommand> [args...]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"vitsweep: unknown subcommand {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    module_name, _ = SUBCOMMANDS[argv[0]]
    try:
        return importlib.import_module(module_name).main(argv[1:])
    except BrokenPipeError:  # `vitsweep compare ... | head`: stop quietly, as the docs of `signal` advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
