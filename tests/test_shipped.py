"""What the repository ships is consistent: the shipped ensemble's script, its record and its members."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from peft_mtl.runs import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _array(script: str, name: str) -> list[str]:
    return shlex.split(re.search(rf"^{name}=\((.*?)\)", script, flags=re.S | re.M).group(1))


def test_the_ensemble_script_rebuilds_the_recorded_shipped_ensembles_from_shipped_sets():
    """Every set the script selects from ships its weights (the selection can be rerun), and each
    record's members are the sets its selection gave weight to, for the tasks they have."""
    script = (REPO / "scripts" / "build_ensemble.sh").read_text()
    pool, students = _array(script, "POOL"), _array(script, "STUDENTS")
    commands = re.findall(r"^peft-mtl ensemble (.*?)\"\$@\"", script, flags=re.S | re.M)
    records = {}
    for command in commands:
        argv = shlex.split(command.replace("\\\n", " "))
        folders = pool + (students if '"${STUDENTS[@]}"' in command else [])
        records[argv[argv.index("--record") + 1]] = folders
    assert records == {"reports/ensemble_bagged.ensemble.json": pool,
                       "reports/ensemble_distilled.ensemble.json": pool + students}
    # The default recipe's students learn from the first record: they are not its members.
    assert not set(students) & set(pool)
    assert "reports/ensemble_bagged.ensemble.json" in (REPO / "scripts" / "train_adapter.sh").read_text()
    for folder in pool + students:
        manifest = read_manifest(REPO / folder)  # weights shipped, not just a manifest
        for rel in list(manifest["adapters"].values()) + list(manifest["heads"].values()):
            assert (REPO / folder / rel).exists(), f"{folder}/{rel} is not shipped"
        if manifest["adapters"]:
            assert all((REPO / folder / rel / "adapter_model.safetensors").is_file()
                       for rel in manifest["adapters"].values())
    for record_path, folders in records.items():
        record = json.loads((REPO / record_path).read_text())
        assert record["split"] == "dev" and set(record["members"]) <= set(folders)
        selection = record["selection"]
        assert set(selection["tasks"]) == {"sst", "qqp", "sts"}
        for task, chosen in selection["tasks"].items():
            assert sum(chosen["weights"].values()) > 0
            for folder, weight in chosen["weights"].items():
                assert weight == 0 or folder in record["members"]
                assert task in read_manifest(REPO / folder)["tasks"]
