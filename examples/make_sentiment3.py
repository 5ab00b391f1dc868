"""Write a 3-class sentiment task (negative / neutral / positive) from the SST-5 files, as JSON Lines.

    python examples/make_sentiment3.py [--data-dir ../shared/data] [--out examples/data]

SST-5 labels 0-1 become "negative", 2 "neutral", 3-4 "positive". The task file that reads
these files is examples/sentiment3.yaml; train it beside a built-in task with
``peft-mtl train --tasks sts,examples/sentiment3.yaml ...``. Rows the SST reader would skip
(malformed) are skipped here too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft_mtl.data.loading import default_data_dir, load_split, task_file
from peft_mtl.data.tasks import get_task

NAMES = {0: "negative", 1: "negative", 2: "neutral", 3: "positive", 4: "positive"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder with ids-sst-{train,dev}.csv (default: ../shared/data)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sst = get_task("sst")
    for split in ("train", "dev"):
        loaded = load_split(task_file(args.data_dir or default_data_dir(), sst, split), sst)
        target = out / f"sentiment3-{split}.jsonl"
        tmp = target.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for ex in loaded.examples:
                f.write(json.dumps({"review": ex.texts[0], "sentiment": NAMES[int(ex.label)]}) + "\n")
        tmp.replace(target)
        print(f"{target}: {len(loaded.examples)} rows")


if __name__ == "__main__":
    main()
