"""What the repository ships is consistent: the shipped ensemble's script, its record and its members."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from peft_mtl.runs import read_manifest

REPO = Path(__file__).resolve().parents[1]


def test_the_ensemble_script_rebuilds_the_recorded_shipped_ensemble_from_shipped_sets():
    script = (REPO / "scripts" / "build_ensemble.sh").read_text()
    command = re.search(r"^exec (peft-mtl ensemble .*?)\"\$@\"", script, flags=re.S | re.M).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    record_path = argv[argv.index("--record") + 1]
    members = [a for a in argv[2:argv.index("--record")] if not a.startswith("--")]
    record = json.loads((REPO / record_path).read_text())
    assert record["members"] == members and record["split"] == "dev"
    for member in members:
        manifest = read_manifest(REPO / member)  # weights shipped, not just a manifest
        assert set(manifest["tasks"]) == {"sst", "qqp", "sts"}
        assert (REPO / member / "shared" / "adapter_model.safetensors").is_file()
