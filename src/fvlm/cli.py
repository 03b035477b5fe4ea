"""The ``fvlm`` command: data subcommands plus the LightningCLI (``fit``, ``validate``, ...).

``fvlm phantom``/``preprocess``/``evaluate``/``eval-ctrate``/``eval-radchestct`` dispatch to their
own parsers; everything else goes to LightningCLI, which is also installed as the ``lightning``
console script so that ``lightning fit --config configs/fvlm.yaml`` works (Lightning itself ships
no such script).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("fvlm.phantom.cli", "Generate the synthetic CT phantom (volumes, masks, reports)."),
    "preprocess": ("fvlm.preprocess.cli", "Build the preprocessing cache from a manifest."),
    "evaluate": ("fvlm.lit_modules.evaluate", "Zero-shot evaluation of checkpoints."),
    "eval-ctrate": ("fvlm.lit_modules.evaluate:ctrate_main", "CT-RATE zero-shot evaluation."),
    "eval-radchestct": (
        "fvlm.lit_modules.evaluate:radchestct_main",
        "Rad-ChestCT external zero-shot evaluation (CT-RATE's labels).",
    ),
}
_LIGHTNING = ("fit", "validate", "test", "predict")


def _usage() -> str:
    lines = ["usage: fvlm <command> [options]", "", "commands:"]
    width = max(map(len, [*_SUBCOMMANDS, *_LIGHTNING]))
    lines += [f"  {name:<{width}} {doc}" for name, (_, doc) in _SUBCOMMANDS.items()]
    lines += [
        f"  {name:<{width}} LightningCLI {name} (see `fvlm {name} --help`)" for name in _LIGHTNING
    ]
    return "\n".join(lines)


def lightning_main(args: list[str] | None = None) -> None:
    """LightningCLI entry point (``lightning fit --config ...``)."""
    from fvlm.lit_modules.cli import run_cli

    run_cli(args)


def main(args: list[str] | None = None) -> None:
    """Dispatch ``fvlm <command>``."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return
    command, rest = args[0], args[1:]
    if command in _SUBCOMMANDS:
        module, _, function = _SUBCOMMANDS[command][0].partition(":")
        entry: Callable[[list[str]], object] = getattr(import_module(module), function or "main")
        result = entry(rest)
        if isinstance(result, int) and result:
            sys.exit(result)
        return
    if command in _LIGHTNING:
        lightning_main(args)
        return
    print(f"fvlm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)
