"""What the repository ships is consistent: the shipped ensemble's script, its record and its members."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from peft_mtl.runs import read_manifest

REPO = Path(__file__).resolve().parents[1]


def test_the_ensemble_script_rebuilds_the_recorded_shipped_ensemble_from_shipped_sets():
    """Every set the script selects from ships its weights (the selection can be rerun), and the
    record's members are the sets the selection gave weight to, for the tasks they have."""
    script = (REPO / "scripts" / "build_ensemble.sh").read_text()
    command = re.search(r"^exec (peft-mtl ensemble .*?)\"\$@\"", script, flags=re.S | re.M).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    record_path = argv[argv.index("--record") + 1]
    with_value = {"--record", "--select", "--cache-dir", "--method", "--regression-method", "--split"}
    pool = [a for i, a in enumerate(argv[2:], start=2) if not a.startswith("--") and argv[i - 1] not in with_value]
    record = json.loads((REPO / record_path).read_text())
    assert record["split"] == "dev" and set(record["members"]) <= set(pool)
    for folder in pool:
        manifest = read_manifest(REPO / folder)  # weights shipped, not just a manifest
        for rel in list(manifest["adapters"].values()) + list(manifest["heads"].values()):
            assert (REPO / folder / rel).exists(), f"{folder}/{rel} is not shipped"
        if manifest["adapters"]:
            assert all((REPO / folder / rel / "adapter_model.safetensors").is_file()
                       for rel in manifest["adapters"].values())
    selection = record["selection"]
    assert set(selection["tasks"]) == {"sst", "qqp", "sts"}
    for task, chosen in selection["tasks"].items():
        assert sum(chosen["weights"].values()) > 0
        for folder, weight in chosen["weights"].items():
            assert weight == 0 or folder in record["members"]
            assert task in read_manifest(REPO / folder)["tasks"]
