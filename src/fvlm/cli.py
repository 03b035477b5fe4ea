"""The ``fvlm`` command: every subcommand, one parser style (jsonargparse, as LightningCLI's).

Each subcommand is one :class:`Command` line in :data:`COMMANDS`. Its options are generated from
the typed signature of the function it runs (help texts from the docstring's ``Args``), so a new
parameter of, say, :func:`fvlm.phantom.generate_phantom` is a new ``fvlm phantom`` option without
touching this file. Every subcommand takes ``--config FILE`` (command-line values override it),
``--print_config`` and ``--help``. ``fit``/``validate``/``test`` are LightningCLI's, also installed
as the ``lightning`` console script so that ``lightning fit --config configs/fvlm.yaml`` works
(Lightning itself ships no such script); ``lightning predict`` is LightningCLI's prediction loop,
while ``fvlm predict`` runs a trained model on one's own scans (:mod:`fvlm.predict`).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module

from jsonargparse import ActionConfigFile, ArgumentParser

__all__ = ["COMMANDS", "Command", "build_parser", "lightning_main", "main", "run_command"]

_LIGHTNING_CLI = "fvlm.lit_modules.cli:run_cli"


@dataclass(frozen=True)
class Command:
    """One ``fvlm`` subcommand.

    Attributes:
        name: The subcommand (``fvlm <name>``).
        target: ``"module:function"``, imported only when the subcommand runs (``fvlm --help``
            stays fast). The function's typed parameters are the options; a function whose only
            parameter is a dataclass gets that dataclass's fields as top-level options. It returns
            the exit status (``None``: 0) or, with ``done``, a value to print.
        help: One line for ``fvlm --help``.
        done: Printed after a successful run, ``{}`` replaced by the function's return value.
        lightning: LightningCLI subcommand: the function gets ``[name, *args]`` and parses them.
        configs: Folder of packaged configs (``fvlm.configs``) that ``--config NAME`` may name
            (``None``: paths only).
        repeatable: List options given once per value (``--query A --query B``), appended.
    """

    name: str
    target: str
    help: str
    done: str | None = None
    lightning: bool = False
    configs: str | None = None
    repeatable: tuple[str, ...] = ()

    def function(self) -> Callable[..., object]:
        """The callable behind ``target``."""
        module, _, attribute = self.target.partition(":")
        return getattr(import_module(module), attribute)


COMMANDS: tuple[Command, ...] = (
    Command(
        "phantom",
        "fvlm.phantom:generate_phantom",
        "Generate the synthetic CT phantom (volumes, masks, reports, labels).",
        done="phantom manifest: {}",
    ),
    Command(
        "preprocess",
        "fvlm.preprocess.cli:preprocess",
        "Build or update the preprocessing cache from a manifest.",
        configs="preprocess",
    ),
    Command(
        "merge-shards",
        "fvlm.preprocess.shards:merge_shards",
        "Write a cache's manifest.csv from the manifests of its `preprocess --shard K/N` runs.",
    ),
    Command(
        "verify-cache",
        "fvlm.preprocess.cache:verify_cache",
        "Check a preprocessing cache's files against their recorded sizes and checksums.",
    ),
    Command("fit", _LIGHTNING_CLI, "Train a model (LightningCLI).", lightning=True, configs=""),
    Command(
        "validate", _LIGHTNING_CLI, "Validation loop (LightningCLI).", lightning=True, configs=""
    ),
    Command("test", _LIGHTNING_CLI, "Test loop (LightningCLI).", lightning=True, configs=""),
    Command(
        "predict",
        "fvlm.predict:predict",
        "Run a trained model on your own scans: findings, embeddings, heatmaps.",
        configs="",
        repeatable=("query",),
    ),
    Command(
        "export",
        "fvlm.pretrained:export",
        "Turn a training checkpoint into a pretrained folder (safetensors + JSON).",
        done="pretrained folder: {}",
    ),
    Command(
        "generate",
        "fvlm.generate:generate",
        "Write radiology reports for your own scans or a cache split with a report generator.",
        configs="",
    ),
    Command(
        "crop-report",
        "fvlm.crop_validity:crop_report",
        "Per anatomy: present, complete and valid in training crops (from a cache's boxes).",
    ),
    Command(
        "evaluate",
        "fvlm.evaluation.commands:evaluate",
        "Zero-shot evaluation of checkpoints on a preprocessing cache.",
    ),
    Command(
        "eval-ctrate",
        "fvlm.evaluation.commands:eval_ctrate",
        "CT-RATE zero-shot evaluation (preprocesses the published layout).",
    ),
    Command(
        "ablation",
        "fvlm.ablation:ablation",
        "The paper's ablations (Tab. 4, 5 and Tab. 1's reference rows): train, evaluate, tabulate.",
        configs="",
    ),
    Command(
        "eval-radchestct",
        "fvlm.evaluation.commands:eval_radchestct",
        "Rad-ChestCT external zero-shot evaluation (CT-RATE's 18 labels).",
    ),
)

_BY_NAME = {command.name: command for command in COMMANDS}


def _settings_class(function: Callable[..., object]) -> type | None:
    """The dataclass of a function whose only parameter is one (its fields become the options)."""
    parameters = list(inspect.signature(function).parameters)
    if len(parameters) != 1:
        return None
    annotation = typing.get_type_hints(function).get(parameters[0])
    return annotation if dataclasses.is_dataclass(annotation) else None


def _epilog(function: Callable[..., object]) -> str | None:
    """The docstring's text between its summary and its ``Args`` section."""
    from docstring_parser import parse  # jsonargparse[signatures] depends on it

    return parse(inspect.getdoc(function) or "").long_description


def build_parser(name: str) -> ArgumentParser:
    """The parser of ``fvlm <name>`` (not for LightningCLI subcommands, which build their own)."""
    command = _BY_NAME[name]
    if command.lightning:
        raise ValueError(f"`fvlm {name}` is parsed by LightningCLI; see fvlm.lit_modules.cli")
    function = command.function()
    parser = ArgumentParser(prog=f"fvlm {name}", description=command.help, epilog=_epilog(function))
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML file of options (command line overrides)."
    )
    settings = _settings_class(function)
    if settings is not None:
        parser.add_class_arguments(settings, fail_untyped=True, sub_configs=True)
    else:
        parser.add_function_arguments(function, fail_untyped=True, sub_configs=True)
    return parser


def run_command(name: str, args: Sequence[str] | None = None) -> int:
    """Parse ``args`` (default: ``sys.argv[1:]``) for ``fvlm <name>``, run it; the exit status.

    A ``ValueError`` or ``FileNotFoundError`` (bad input, named in its message) becomes a one-line
    error and status 2; an interrupt, status 130.
    """
    return _run(name, list(sys.argv[1:] if args is None else args), console=args is None)


def _run(name: str, args: list[str], console: bool) -> int:
    command = _BY_NAME[name]
    if command.configs is not None:
        args = _packaged_config_args(args, command.configs)
    args = _appending(args, command.repeatable)
    function = command.function()
    if command.lightning:
        if console:  # LightningCLI reads sys.argv itself, and warns when also given args
            sys.argv[1:] = [name, *args]
        function(None if console else [name, *args])
        return 0
    parser = build_parser(name)
    config = parser.parse_args(args)
    config.pop("config", None)
    settings = _settings_class(function)
    try:
        if settings is not None:
            result = function(settings(**config.as_dict()))
        else:
            result = function(**parser.instantiate(config).as_dict())
    except (ValueError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    if command.done is not None:
        print(command.done.format(result))
        return 0
    return int(result or 0)


def _appending(args: list[str], options: tuple[str, ...]) -> list[str]:
    """``--name value`` of a repeatable option as jsonargparse's appending ``--name+ value``."""
    flags = {f"--{name}" for name in options}
    resolved = []
    for arg in args:
        option, equals, value = arg.partition("=")
        resolved.append(f"{option}+{equals}{value}" if option in flags else arg)
    return resolved


def _packaged_config_args(args: list[str], group: str) -> list[str]:
    """``args`` with each ``--config NAME`` that is no file replaced by the packaged config's path.

    So ``fvlm preprocess --config chest`` and ``fvlm fit --config demo`` work from any folder; a
    value that is neither is left for the parser to reject.
    """
    from fvlm.config_files import resolve_config

    resolved = list(args)
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option != "--config" or (not equals and i + 1 == len(args)):
            continue
        index = i if equals else i + 1
        value = value if equals else args[index]
        try:
            path = str(resolve_config(value, group))
        except FileNotFoundError:
            continue
        resolved[index] = f"--config={path}" if equals else path
    return resolved


def _overview() -> ArgumentParser:
    """``fvlm --help``: the subcommands and their one-line help."""
    parser = ArgumentParser(
        prog="fvlm",
        description="fVLM: fine-grained vision-language pre-training for 3D CT. "
        "`fvlm <command> --help` shows a command's options.",
    )
    subcommands = parser.add_subcommands(required=True, dest="command")
    for command in COMMANDS:
        subcommands.add_subcommand(command.name, ArgumentParser(), help=command.help)
    return parser


def lightning_main(args: Sequence[str] | None = None) -> int:
    """The ``lightning`` console script: LightningCLI alone (``lightning fit --config ...``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in _BY_NAME and _BY_NAME[argv[0]].lightning:
        return _run(argv[0], argv[1:], console=args is None)
    _BY_NAME["fit"].function()(None if args is None else argv)  # LightningCLI's help or error
    return 0


def main(args: Sequence[str] | None = None) -> int:
    """``fvlm <command> [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] not in _BY_NAME:
        _overview().parse_args(argv)  # prints the overview (--help) or the error, and exits
        return 2
    return _run(argv[0], argv[1:], console=args is None)
