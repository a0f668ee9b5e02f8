"""Command-line parsing for the recipes: dataclasses, an optional YAML `--config`, command-line overrides."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def parse_args(dataclass_types: tuple, args: list[str] | None = None) -> tuple:
    """Parse `args` into the dataclasses; values in `--config file.yaml` are defaults the command line overrides."""
    args = list(sys.argv[1:] if args is None else args)
    # No abbreviations: `--clone_loss 5` must not silently mean `--clone_loss_weight 5`.
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="A YAML file of default values.")
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
