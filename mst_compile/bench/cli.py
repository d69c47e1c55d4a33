"""What the command lines of the package and the examples share: help that shows each option's default and
keeps the description's own line breaks."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (examples stay one per line), ``(default: X)`` after each option's help
    unless the default is ``None``, ``False`` or empty."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default in ("", [], argparse.SUPPRESS):
            return text
        if action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE) or action.option_strings:
            return f"{text} (default: %(default)s)".strip()
        return text


def doc(text: str) -> str:
    """A module docstring as help text: reST's double backquotes dropped."""
    return text.replace("``", "").strip()


def parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc(description), formatter_class=HelpFormatter, **kwargs)
