"""Command-line flags generated from the dataclass configs.

Each config field carries its own help text (and, where the name on the command line
differs from the field's, its flag) in ``dataclasses.field(metadata=...)`` through
:func:`option`. :func:`add_config_arguments` turns a config class into argparse flags —
nested configs get a prefix (``lora.rank`` → ``--lora-rank``) — and
:func:`overrides_from_args` reads back only the flags the user gave, so a ``--config`` file
is overridden by exactly those. A field is declared once; its flag, type, default, help and
the name an error message uses all follow from that one declaration.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any

_MISSING = dataclasses.MISSING


class Precision(str, enum.Enum):
    """Compute precision of a run or a loaded set, declared once for flags, configs and dispatch.

    ``auto`` resolves per device (peft_mtl.device.resolve_precision): bf16 where it is native,
    fp16 + a gradient scaler on GPUs without bf16, fp32 otherwise."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


PRECISIONS = tuple(p.value for p in Precision)


def option(default: Any = _MISSING, *, help: str, flag: str | None = None, choices: tuple | None = None,
           factory: Any = _MISSING, cli: bool = True, metavar: str | None = None, show_default: bool = True) -> Any:
    """A dataclass field with what the command line needs to know about it.

    Args:
        default / factory: the field's default (``factory`` for mutable defaults).
        help: one line for ``--help``; the default is appended automatically.
        flag: the flag when it is not ``--`` + the dashed field path (``--rslora``).
        choices: allowed values, checked by argparse and shown in ``--help``.
        cli: False for fields that only a ``--config`` file sets.
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "cli": cli, "metavar": metavar,
                "show_default": show_default}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _strip_optional(hint) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def config_fields(cls, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted path, field, type hint) of every leaf field, nested configs flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(config_fields(hint, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, f, hint))
    return out


def flag_for(cls, path: str) -> str:
    """The command-line flag of the field at ``path`` (``smart.bregman_mu`` → ``--bregman-mu``)."""
    for p, f, _ in config_fields(cls):
        if p == path:
            return f.metadata.get("flag") or "--" + p.replace(".", "-").replace("_", "-")
    raise KeyError(path)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _list_parser(item_type):
    def parse(text: str) -> list:
        try:
            return [item_type(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__} values, got {text!r}")
    return parse


class _KeyValue(argparse.Action):
    """``--flag KEY=VALUE``, repeatable, into a dict."""

    def __init__(self, *args, value_type=str, **kwargs):
        self.value_type = value_type
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        current = dict(getattr(namespace, self.dest, None) or {})
        key, sep, value = values.partition("=")
        if not sep or not key.strip():
            parser.error(f"{option_string} expects KEY=VALUE, got {values!r}")
        try:
            current[key.strip()] = self.value_type(value)
        except ValueError:
            parser.error(f"{option_string} {values!r}: {value!r} is not a valid {self.value_type.__name__}")
        setattr(namespace, self.dest, current)


def add_config_arguments(parser: argparse.ArgumentParser, cls, groups: dict[str, str] | None = None) -> None:
    """Add one flag per field of ``cls`` (nested configs included) to ``parser``.

    Defaults are ``argparse.SUPPRESS``: the namespace holds only the flags given, which is
    what lets them override a ``--config`` file. ``groups`` maps a dotted prefix to an
    argparse group title (``{"lora.": "LoRA"}``); other fields go to ``parser`` itself.
    """
    made: dict[str, Any] = {}
    for path, f, hint in config_fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or "help" not in meta:
            continue
        title = next((t for p, t in (groups or {}).items() if path.startswith(p)), None)
        target = parser
        if title:
            target = made.setdefault(title, parser.add_argument_group(title))
        flag = meta.get("flag") or "--" + path.replace(".", "-").replace("_", "-")
        default = _default_of(f)
        shown = "" if default in (None, [], {}) or not meta.get("show_default", True) else f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"
        kwargs: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS, "help": meta["help"] + shown}
        base, _ = _strip_optional(hint)
        origin = typing.get_origin(base)
        if base is bool:
            if meta.get("flag") and meta["flag"].startswith("--no-"):
                kwargs.update(action="store_const", const=False)
                kwargs["help"] = meta["help"]
            elif default is True or default is None:
                kwargs.update(action=argparse.BooleanOptionalAction)
            else:
                kwargs.update(action="store_const", const=True)
                kwargs["help"] = meta["help"]
        elif origin is list:
            (item,) = typing.get_args(base)
            kwargs.update(type=_list_parser(item), metavar=meta.get("metavar") or "A,B,...")
        elif origin is dict:
            value_type = typing.get_args(base)[1]
            kwargs.update(action=_KeyValue, value_type=value_type, metavar=meta.get("metavar") or "KEY=VALUE")
        else:
            kwargs.update(type=base)
            if not meta.get("choices"):
                kwargs["metavar"] = meta.get("metavar") or path.rsplit(".", 1)[-1].upper()
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        target.add_argument(flag, **kwargs)


def overrides_from_args(args: argparse.Namespace, cls) -> dict[str, Any]:
    """{dotted path: value} for the config flags present in ``args``."""
    paths = {p for p, _, _ in config_fields(cls)}
    return {k: v for k, v in vars(args).items() if k in paths}


def apply_overrides(config, overrides: dict[str, Any]) -> None:
    """Set dotted-path values on a (nested) config in place."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        target = config
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)


def differences(a, b, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Dotted paths of the leaf fields whose values differ between two configs of one class."""
    out = []
    for path, _, _ in config_fields(type(a)):
        if path in ignore:
            continue
        va, vb = a, b
        for name in path.split("."):
            va, vb = getattr(va, name), getattr(vb, name)
        if va != vb:
            out.append(path)
    return out
