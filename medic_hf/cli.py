"""The command line: `medic-hf clone|poison|benchmark ...`, and the argument parsing the scripts share.

Scripts parse dataclasses (a script's own arguments, `MedicConfig`, ...) with an optional YAML `--config` whose
values are defaults the command line overrides. Flags are never abbreviated.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import get_type_hints

import yaml
from transformers import HfArgumentParser

COMMANDS = {
    "clone": ("medic_hf.scripts.clone", "remove a backdoor from a model with MEDIC"),
    "poison": ("medic_hf.scripts.poison", "train a trojaned model, to evaluate removal"),
    "benchmark": ("medic_hf.scripts.benchmark", "MEDIC against the baseline defenses on attacks x defenses x seeds"),
}


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose --help shows each dataclass's own fields as one group and the fields it inherits
    after them: `MedicConfig`'s options come before the ~140 of `transformers.TrainingArguments`."""

    def _add_dataclass_arguments(self, dtype) -> None:
        type_hints = get_type_hints(dtype)
        fields = [field for field in dataclasses.fields(dtype) if field.init]
        # One group per class of the hierarchy, the class's own first: a field goes to the first class that declares
        # it, its new fields before the inherited defaults it changes (e.g. MedicConfig's learning_rate), so
        # MedicConfig's options come before ClassifierConfig's, and those before TrainingArguments'.
        groups, placed = [], set()
        for cls in (c for c in dtype.__mro__ if dataclasses.is_dataclass(c)):
            own = set(cls.__dict__.get("__annotations__", {}))
            base_names = {
                f.name for c in cls.__mro__[1:] if dataclasses.is_dataclass(c) for f in dataclasses.fields(c)
            }
            group = sorted(
                (f for f in fields if f.name in own and f.name not in placed), key=lambda f: f.name in base_names
            )
            placed.update(f.name for f in group)
            title = f"{cls.__name__} options" + ("" if cls is dtype else " (inherited)")
            groups.append((title, group))
        for title, group_fields in groups:
            if not group_fields:
                continue
            group = self.add_argument_group(title)
            for field in group_fields:
                field.type = type_hints[field.name]
                self._parse_dataclass_field(group, field)


def make_parser(dataclass_types: tuple, description: str | None = None) -> ArgumentParser:
    """A parser of `dataclass_types` with a `--config file.yaml` option; `description` opens --help."""
    parser = ArgumentParser(
        dataclass_types,
        description=description,
        usage="%(prog)s [--config FILE.yaml] [--option value ...]   (every option below; --help lists them)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--clone_loss 5` must not silently mean `--clone_loss_weight 5`
    )
    parser.add_argument("--config", type=str, default=None, help="A YAML file of default values.")
    return parser


def parse_args(parser: HfArgumentParser | tuple, args: list[str] | None = None) -> tuple:
    """Parse `args` into the dataclasses; values in `--config file.yaml` are defaults the command line overrides.

    `parser` is a parser from `make_parser`, or a tuple of dataclass types to make one for.
    """
    parser = make_parser(parser) if isinstance(parser, tuple) else parser
    args = list(sys.argv[1:] if args is None else args)
    config_path = None
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise SystemExit("--config needs a YAML file path")
        config_path = args[i + 1]
        del args[i : i + 2]
    if config_path is not None:
        values = yaml.safe_load(Path(config_path).read_text()) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"{config_path}: unknown keys {unknown}; check their spelling against --help.")
        parser.set_defaults(**values)
        # A YAML value fills a required argument, so it no longer has to be typed on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    outputs = parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)
    return tuple(o for o in outputs if not _is_namespace(o))


def _is_namespace(obj) -> bool:
    return type(obj).__name__ == "Namespace"


def main(argv: list[str] | None = None) -> None:
    """`medic-hf <command> [options]`: runs `medic_hf.scripts.<command>.main(options)`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        lines = ["usage: medic-hf {clone,poison,benchmark} [options]   (medic-hf <command> --help for its options)"]
        lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    program, sys.argv[0] = sys.argv[0], f"medic-hf {argv[0]}"  # the name --help and errors show
    try:
        module.main(argv[1:])
    finally:
        sys.argv[0] = program
