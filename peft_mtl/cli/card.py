"""``peft-mtl card``: (re)write the model card (README.md) of saved sets from their manifests."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ..errors import UserError

HELP = "write the Hugging Face model card (README.md) of saved sets from their manifests"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", metavar="SET", help="set folders; with --recursive, folders to search")
    p.add_argument("--recursive", action="store_true", help="every set (a folder with peft_mtl.json) under SET")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..model.model_card import write_card  # deferred: the model layer imports torch
    from ..model.saved_sets import MANIFEST, read_manifest  # deferred: as above

    folders: list[Path] = []
    for item in map(Path, args.folders):
        if args.recursive:
            folders += sorted(p.parent for p in item.rglob(MANIFEST))
        elif (item / MANIFEST).is_file():
            folders.append(item)
        else:
            raise UserError(f"{item}: not a set folder ({MANIFEST} missing); --recursive searches under it")
    written = [str(write_card(folder, read_manifest(folder), command=_train_command(folder))) for folder in folders]
    print(json.dumps({"cards": written}))
    return 0


def _train_command(folder: Path) -> str | None:
    """The `peft-mtl train` command of a set whose manifest predates recording it (from its config)."""
    from ..model.saved_sets import read_manifest  # deferred: the model layer imports torch
    from ..training.config import TrainConfig, flags_from_config  # deferred: as above

    config = read_manifest(folder).get("config")
    if not config or "tasks" not in config:
        return None
    try:
        return "peft-mtl train " + shlex.join(flags_from_config(TrainConfig.from_dict(config)))
    except UserError:  # a config of an older format: the card says less
        return None
