"""What every command line shares: the help layout, ``--config`` / ``--print-config``, and
the paragraph that says how to list and override config keys.

Kept free of heavy imports (torch, DeepSpeed, transformers) so that ``--help`` and
``--print-config`` answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Description and epilog as written (examples keep their lines), and ``(default: X)``
    after each option's help, except where there is nothing to show (no default, a flag that
    is off, an empty string) or the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == "":
            return text
        return super()._get_help_string(action)


def config_epilog(prog: str) -> str:
    """The paragraph on config keys for a command that takes ``--config``."""
    return (
        "Config keys: any other --section.key=value argument overrides the YAML file (e.g.\n"
        "--train.steps=500, --data.sources[0].lang=sw). To list every key with its value and\n"
        f"documentation: {prog} --print-config [--config FILE] [--section.key=value ...]"
    )


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """``--config FILE`` and ``--print-config``."""
    parser.add_argument("--config", metavar="FILE", help=config_help)
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config (the file, then the --section.key=value overrides) as YAML with "
             "every key's documentation, and exit",
    )


def print_config(prog: str, config: str | None, overrides: list[str]) -> int:
    """Print the resolved config as commented YAML; the exit code (0, or 2 for a bad config)."""
    from mmkd_ds.config import ConfigError, load_config
    from mmkd_ds.config.printing import config_yaml

    try:
        cfg = load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    source = config or "the defaults (no --config)"
    header = [f"Resolved run config: {source}" + (f", then {' '.join(overrides)}" if overrides else "") + ".",
              "Every key can be set in the YAML file or on the command line as --section.key=value."]
    sys.stdout.write(config_yaml(cfg, header))
    return 0


def require_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, *flags: str) -> None:
    """Exit 2 naming the ``flags`` left empty, as argparse does for required options.

    Checked after ``--print-config`` has had its turn, which needs none of them (so they cannot
    be declared ``required=True``).
    """
    missing = [flag for flag in flags if not getattr(args, flag.lstrip("-").replace("-", "_"))]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
