"""What the repository ships is consistent: the shipped ensemble's script, its record and its members."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from peft_mtl.model.saved_sets import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _array(script: str, name: str) -> list[str]:
    return shlex.split(re.search(rf"^{name}=\((.*?)\)", script, flags=re.S | re.M).group(1))


def _records(script: str, arrays: dict[str, list[str]]) -> dict[str, tuple[list[str], bool]]:
    """Each `peft-mtl ensemble` command of the script: record path -> (its folders, selected on dev?)."""
    records = {}
    for command in re.findall(r"^peft-mtl ensemble (.*?)\"\$@\"", script, flags=re.S | re.M):
        folders = []
        for word in shlex.split(command.replace("\\\n", " ")):
            name = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
            if name:
                folders += arrays[name.group(1)]
            elif word.startswith("adapters/"):
                folders.append(word)
        argv = shlex.split(command.replace("\\\n", " "))
        records[argv[argv.index("--record") + 1]] = (folders, "--select" in argv)
    return records


def test_the_ensemble_script_rebuilds_the_recorded_shipped_ensembles_from_shipped_sets():
    """Every set the script ensembles ships its weights (each record can be rebuilt), a record
    selected on dev gives weight only to its members, and an unselected one weighs them equally."""
    script = (REPO / "scripts" / "build_ensemble.sh").read_text()
    pool, students = _array(script, "POOL"), _array(script, "STUDENTS")
    records = _records(script, {"POOL": pool, "STUDENTS": students})
    assert records == {
        "reports/ensemble_students.ensemble.json": (students, False),
        "reports/ensemble_bagged.ensemble.json": (pool, True),
        "reports/ensemble_distilled.ensemble.json": (pool + students, True),
        "reports/ensemble_seeds3.ensemble.json": ([f"adapters/ensemble/st_r16_4ep_seed{s}" for s in range(3)], False)}
    # The default recipe's students learn from the bagged record: they are not its members.
    assert not set(students) & set(pool)
    assert "reports/ensemble_bagged.ensemble.json" in (REPO / "scripts" / "train_adapter.sh").read_text()
    # The students are every seed of that recipe: the same flags, seeds 0, 1, 2, ...
    configs = [read_manifest(REPO / folder)["config"] for folder in students]
    assert sorted(c["seed"] for c in configs) == list(range(len(students)))
    assert all({k: v for k, v in c.items() if k not in ("seed", "out")} ==
               {k: v for k, v in configs[0].items() if k not in ("seed", "out")} for c in configs)
    for folder in {f for folders, _ in records.values() for f in folders}:
        manifest = read_manifest(REPO / folder)  # weights shipped, not just a manifest
        for rel in list(manifest["adapters"].values()) + list(manifest["heads"].values()):
            assert (REPO / folder / rel).exists(), f"{folder}/{rel} is not shipped"
        if manifest["adapters"]:
            assert all((REPO / folder / rel / "adapter_model.safetensors").is_file()
                       for rel in manifest["adapters"].values())
    for record_path, (folders, selected) in records.items():
        record = json.loads((REPO / record_path).read_text())
        assert record["split"] == "dev" and set(record["members"]) <= set(folders)
        if not selected:
            assert record["members"] == folders and record.get("selection") is None
            assert record.get("weights") is None or len(set(record["weights"])) == 1
            continue
        selection = record["selection"]
        assert set(selection["tasks"]) == {"sst", "qqp", "sts"}
        for task, chosen in selection["tasks"].items():
            assert sum(chosen["weights"].values()) > 0
            for folder, weight in chosen["weights"].items():
                assert weight == 0 or folder in record["members"]
                assert task in read_manifest(REPO / folder)["tasks"]
