"""MkDocs hook: the command-line reference, generated from the parser when the site is built.

The train flags come from the config dataclasses (``peft_mtl.options``), so every flag is
documented once, in the code that declares it."""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def _reference() -> str:
    from peft_mtl.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = []
    for name, sub in commands.choices.items():
        sub.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100, max_help_position=40)
        parts.append(f"### peft-mtl {name}\n\n```text\n{sub.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, _reference())
    return markdown
