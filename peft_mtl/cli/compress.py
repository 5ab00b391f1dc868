"""``peft-mtl compress``: every LoRA adapter of a set cut to its best low-rank fit, scored on dev."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ..options import PRECISIONS
from .options import SPLITS

HELP = "cut every LoRA adapter of a set to its best low-rank fit (truncated SVD); writes a new set and scores it on dev"
DESCRIPTION = ("Each adapter's update scale·BA is replaced by its truncated SVD at the given rank (the closest update "
               "of that rank). Shared adapters get --rank, task-private ones --task-rank (default: --rank). The new "
               "set is scored on --split (dev) and the score written into its manifest; `peft-mtl train --init-from "
               "OUT` fine-tunes it.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, required=True, help="rank of every adapter (of the shared ones with --task-rank)")
    p.add_argument("--task-rank", type=int, default=None, help="rank of the adapters only one task uses")
    p.add_argument("--split", default="dev", choices=SPLITS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--device", default="auto")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="write the set without scoring it")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..artifacts import write_json_atomic  # deferred: the rest load torch, transformers and peft
    from ..inference.scoring import evaluate_folder  # deferred: as above
    from ..model.compress import compress_set  # deferred: as above
    from ..model.model_card import write_card  # deferred: as above
    from ..model.saved_sets import MANIFEST  # deferred: as above

    result = compress_set(args.folder, args.out, args.rank, args.task_rank, overwrite=args.overwrite)
    manifest_path = Path(args.out) / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["compressed_from"]["command"] = "peft-mtl " + shlex.join(argv)
    if not args.no_eval:
        scores = evaluate_folder(args.out, args.data_dir, args.split, args.strict, args.backbone, args.precision,
                                 args.device, progress=not args.no_progress)
        overall = scores.pop("overall", None)
        manifest["metrics"] = {args.split: scores, "overall": overall}
    write_json_atomic(manifest_path, manifest)
    write_card(args.out, manifest)  # with the scores just measured
    before = (manifest["compressed_from"].get("metrics") or {}).get("overall")
    after = manifest["metrics"].get("overall")
    print(json.dumps({"out": str(result.out), "ranks": result.ranks,
                      "energy_kept": {k: round(v, 4) for k, v in result.energy_kept.items()},
                      "trainable_parameters": result.trainable,
                      "percent_trainable": round(100 * result.trainable / result.total, 2),
                      "overall_before": before, "overall_after": after}))
    return 0
