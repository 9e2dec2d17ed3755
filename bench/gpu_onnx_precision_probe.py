"""Where does a CUDA int4 build of the bundled fine-tune lose its accuracy? (bench/adapter_serving.py --device cuda
found merged int4 and base + adapter at 0.04-0.08 on CUDA against 0.88 for the PyTorch model, CUDA graphs on or off.)

    python3 bench/gpu_onnx_precision_probe.py --out probe.json      (bench/gpu_device.sh probe)

One `grove run` of configs/smollm2-tone.json on CUDA (ship: merged), then the run's merged HF folder is scored
as PyTorch (fp32, on the GPU) and built again as: CUDA fp16, CUDA int4 with bf16 io (use_cuda_bf16), CPU int4;
each is scored on the first 120 rows of configs/data/tone.jsonl with the run's shipped prompt
(adapter_serving.score). The JSON is rewritten after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adapter_serving import RunFailed, on_cuda, run, score  # noqa: E402


def merged_folder(store_root: Path, key: str) -> Path:
    from grove.store import ArtifactStore

    store = ArtifactStore(str(store_root))
    folder = store.materialize(store.lookup("merge_adapters", key))
    return next(p.parent for p in folder.rglob("config.json"))


def pytorch_score(folder: Path, spec_file: Path) -> dict:
    """The merged HF folder in fp32 on the GPU, greedy, with the shipped prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grove.scoring import first_line, summarize
    from grove.shipped import render_prompt

    spec = json.loads(spec_file.read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).to("cuda").eval()
    rows = [json.loads(line) for line in (ROOT / "configs" / "data" / "tone.jsonl").read_text().splitlines()
            if line.strip()][:120]
    predictions = []
    for row in rows:
        ids = tokenizer(render_prompt(spec, row), add_special_tokens=False, return_tensors="pt").input_ids.to("cuda")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=spec["max_new_tokens"], do_sample=False,
                                 eos_token_id=spec["eos_token_ids"], pad_token_id=spec["eos_token_ids"][0])
        predictions.append(first_line(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    summary = summarize(predictions, [str(r[spec["label_col"]]).strip() for r in rows])
    return {"accuracy": summary["accuracy"], "predicted": summary["predicted"], "first_predictions": predictions[:8]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tone.json"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from grove.settings import BuildSettings
    from tasks.build_onnx.stage import run_builder

    out = Path(args.out)
    result: dict = {"command": "python3 bench/gpu_onnx_precision_probe.py", "rows": "first 120 of tone.jsonl"}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    config = on_cuda(json.loads(Path(args.config).read_text()))
    config["grove"]["benchmark"] = {"prompts": 1, "max_new_tokens": 8, "warmup": 1, "repeats": 1}
    with tempfile.TemporaryDirectory(prefix="grove-precision-probe-") as tmp:
        folder = Path(tmp)
        try:
            merged = run(config, folder, "merged")
        except RunFailed as exc:
            result["error"] = str(exc)
            save()
            raise SystemExit(1)
        onnx = merged["stages"]["build_onnx"]["summary"]
        result["grove_run"] = {"fine_tuned_pytorch": merged["stages"]["evaluate"]["summary"]["fine_tuned"]["accuracy"],
                               "cuda_int4_as_built": onnx.get("accuracy"),
                               "prompts_unlike_training": onnx.get("prompts_unlike_training"),
                               "sample": onnx.get("sample")}
        spec = merged["out"] / "model" / "grove_prompt.json"
        result["scores"] = {"cuda_int4_as_built": score(merged["out"] / "model", spec, None)}
        save()
        source = merged_folder(folder / "store", merged["stages"]["merge_adapters"]["key"])
        started = time.monotonic()
        try:
            result["scores"]["pytorch_fp32_merged_folder"] = pytorch_score(source, spec)
        except Exception as exc:  # noqa: BLE001 - a probe records what failed
            result["scores"]["pytorch_fp32_merged_folder"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        result["scores"]["pytorch_fp32_merged_folder"]["seconds"] = round(time.monotonic() - started, 1)
        save()
        builds = {"cuda_fp16": BuildSettings(precision="fp16", execution_provider="cuda"),
                  "cuda_int4_bf16_io": BuildSettings(precision="int4", execution_provider="cuda",
                                                     extra_options={"use_cuda_bf16": "true"}),
                  "cpu_int4": BuildSettings(precision="int4", execution_provider="cpu")}
        for name, build in builds.items():
            target = folder / name
            try:
                run_builder(source, target, build, False)
                result["scores"][name] = score(target, spec, None)
            except Exception as exc:  # noqa: BLE001
                result["scores"][name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            print(name, json.dumps(result["scores"][name]), file=sys.stderr)
            save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
