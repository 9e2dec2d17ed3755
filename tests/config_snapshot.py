"""Each shipped config (configs/*.json) parsed into a machine-independent JSON dict.

tests/test_config_snapshots.py compares today's parse with tests/data/config_snapshots/,
written before the config package was split (so `grove run --config configs/X.json`
still means what it meant). Regenerate only on purpose:
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python tests/config_snapshot.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "tests" / "data" / "config_snapshots"
# phi3-tone names a hub model absent offline: parse it against a stand-in without config.json
HUB_STAND_IN = {"microsoft/Phi-3-mini-4k-instruct"}


def parse_shipped(name: str) -> dict:
    from unittest import mock

    import grove.models
    from flows.config import load_config
    from grove.settings import ModelSettings

    real = grove.models.locate_model

    def locate(model_name, find_local, trust_remote_code):
        if model_name in HUB_STAND_IN:
            return ModelSettings(name=model_name, path=None, trust_remote_code=trust_remote_code,
                                 content_sha256="stand-in")
        return real(model_name, find_local, trust_remote_code)

    with mock.patch.object(grove.models, "locate_model", locate):
        cfg = load_config(ROOT / "configs" / name, base_dir=ROOT, list_remote_data=False)
    dumped = cfg.model_dump(mode="json")
    return json.loads(json.dumps(dumped).replace(str(ROOT), "<ROOT>"))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    for config in sorted((ROOT / "configs").glob("*.json")):
        (SNAPSHOTS / config.name).write_text(json.dumps(parse_shipped(config.name), indent=1, sort_keys=True) + "\n")
        print("wrote", config.name)
