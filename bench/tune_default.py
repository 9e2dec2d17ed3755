"""Choose the default config's training settings by measurement on the eval split.

Runs load_data -> template_corpus -> train -> evaluate (the real stages, cached in the
artifact store) for each variant of configs/smollm2-tone.json and prints one JSON line
per variant: accuracy on the eval split (phrases never seen in training), per label.

    python bench/tune_default.py [VARIANT ...]      # names from VARIANTS below; default: all
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.config import load_config  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.load_data import load_data  # noqa: E402
from grove.result_storage import prefect_result_storage  # noqa: E402
from grove.stage import RunContext, stage_run  # noqa: E402
from grove.store import ArtifactStore  # noqa: E402
from tasks.template_corpus import template_corpus  # noqa: E402
from tasks.train import train  # noqa: E402

# name -> (pre_process overrides, lora config overrides, training_args overrides, grove overrides)
VARIANTS = {
    # configs/phi3-tone.json's settings (join 1024, loss on every token, r64, batch 1 x 4 accumulation)
    "olive-faithful": ({"corpus_strategy": "join", "source_max_len": 1024},
                       {"lora_r": 64, "lora_alpha": 64, "lora_dropout": 0.1},
                       {"learning_rate": 1e-4, "num_train_epochs": 3, "per_device_train_batch_size": 1,
                        "gradient_accumulation_steps": 4},
                       {"completion_only_loss": False, "lora_top_layers": None}),
    "default": ({}, {}, {}, {}),
    "all-layers-3-epochs-lr3e-4": ({}, {}, {"num_train_epochs": 3, "learning_rate": 3e-4},
                                   {"lora_top_layers": None}),
    "no-completion-only": ({}, {}, {}, {"completion_only_loss": False}),
    "join-completion-only": ({"corpus_strategy": "join", "source_max_len": 256}, {}, {}, {}),
    "lr3e-4": ({}, {}, {"learning_rate": 3e-4}, {}),
    "1-epoch": ({}, {}, {"num_train_epochs": 1}, {}),
    "all-layers-2-epochs-lr5e-4": ({}, {}, {}, {"lora_top_layers": None}),
    "top10-2-epochs": ({}, {}, {}, {"lora_top_layers": 10}),
    "top15-3-epochs": ({}, {}, {"num_train_epochs": 3, "learning_rate": 3e-4}, {"lora_top_layers": 15}),
}


def variant_config(name: str) -> Path:
    raw = json.loads((ROOT / "configs/smollm2-tone.json").read_text())
    pre, lora, args, grove = VARIANTS[name]
    raw = copy.deepcopy(raw)
    raw["data_configs"][0]["pre_process_data_config"]["params"].update(pre)
    raw["passes"]["lora"]["config"].update(lora)
    raw["passes"]["lora"]["config"]["training_args"].update(args)
    raw["grove"].update(grove)
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(ROOT / "configs/data/tone.jsonl")
    raw["engine"]["cache_dir"] = os.environ.get("GROVE_TUNE_STORE", str(ROOT / ".grove-cache"))
    path = Path(tempfile.mkdtemp()) / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def main(names: list[str]) -> None:
    from prefect import flow

    @flow(name="grove-tune")
    def tune(name: str) -> dict:
        cfg = load_config(variant_config(name))
        store = ArtifactStore(cfg.artifact_root)
        with stage_run(RunContext(store=store, device=cfg.device, result_storage=prefect_result_storage(store))):
            started = time.monotonic()
            data = load_data(cfg.data)
            corpus = template_corpus(cfg.corpus, data, cfg.model)
            adapter = train(cfg.train, corpus, cfg.model)
            scores = evaluate(cfg.evaluate, data, corpus, cfg.model, adapter)
        tuned = scores.summary["fine_tuned"]
        return {"variant": name, "accuracy": tuned["accuracy"],
                "per_label": {k: v["accuracy"] for k, v in tuned["per_label"].items()},
                "base_accuracy": scores.summary["base"]["accuracy"], "eval_loss": tuned["eval_loss"],
                "train": {k: adapter.summary.get(k) for k in ("steps", "first_loss", "final_loss", "seconds")},
                "seconds": round(time.monotonic() - started, 1)}

    for name in names or list(VARIANTS):
        print(json.dumps(tune(name)), flush=True)


if __name__ == "__main__":
    print(json.dumps({"command": "python " + " ".join(sys.argv)}))
    main(sys.argv[1:])
