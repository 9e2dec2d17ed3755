"""Which project modules are in which cache key, and why: the README's table (`python -m flows.key_table`).

A key covers the source of its module's import closure (grove/cache.py), so what is in a key is
decided by the import graph alone: display and cleanup code stays out of every key because no
keyed module imports it (the flow hands the stages a publisher and progress callbacks through
the RunContext instead). The table groups the closures: what every key shares, what every stage
shares, what each adds. tests/test_cache_keys.py checks that the README holds exactly this table
and that no key reaches a module of OUTSIDE_EVERY_KEY.
"""

from __future__ import annotations

from grove.cache import import_closure

# Every module a key is computed for: the seven stages, and the int4 base with LoRA slots that
# every fine-tune of one base model shares (grove.ship: adapter; keyed in tasks/build_onnx/base.py).
KEYS = {"load_data": "tasks.load_data", "template_corpus": "tasks.template_corpus", "train": "tasks.train.stage",
        "evaluate": "tasks.evaluate", "merge_adapters": "tasks.merge_adapters", "build_onnx": "tasks.build_onnx.stage",
        "benchmark": "tasks.benchmark.stage", "adapter base": "tasks.build_onnx.base"}
EVERY_KEY, EVERY_STAGE = "every key", "every stage"

WHY = {
    EVERY_KEY: "the key itself (`cache`, `pysource`); the store that reads a stage's inputs and writes its entry "
               "(`store.*`, `credentials`); the settings and their defaults; the device and GROVE_HOME (`machine`); the machine facts "
               "(`machine_facts`: which library versions, device and dtype enter each key)",
    EVERY_STAGE: "the decorator that runs a stage, records its summary and stores what it wrote",
    "load_data": "reading, checking, deduplicating and splitting the data files",
    "template_corpus": "the tokenizer and the prompt template",
    "train": "the training loop, its CUDA setup, the data-parallel and multi-node jobs",
    "evaluate": "model loading, the engines and the scoring",
    "merge_adapters": "model loading and merging",
    "build_onnx": "the builder, quantization, the search, the base and the adapter export, scoring as shipped",
    "benchmark": "the engines and the worker process that measures each one",
    "adapter base": "the builder, quantization and the LoRA slots (adapters.py, which also holds the adapter "
                    "export): nothing of the stage around them, so editing scoring or the search never "
                    "rebuilds a base",
}

# Modules (and packages) that cannot change any output: in a key, every edit to them would rerun
# the stage. The reason is what the test says when a new import brings one into a key.
OUTSIDE_EVERY_KEY = {
    "flows": "the CLI, the flow, placement, the Prefect UI artifacts (flows/ui.py), progress lines and run "
             "records show, dispatch or record results and never make one; a stage reaches them only "
             "through the RunContext (publisher, on_progress, on_stage_start/on_stage_end)",
    "grove.store.gc": "garbage collection deletes what nothing references and never makes an output; "
                      "import it from grove.store.gc, never through grove/store/__init__.py, which every stage imports",
}


def rows() -> list[tuple[str, list[str], str]]:
    """(key or group, the modules it adds to the groups above it, why they can change its output)."""
    closures = {name: set(import_closure(module)) for name, module in KEYS.items()}
    shared = set.intersection(*closures.values())
    stages = [name for name in KEYS if name != "adapter base"]
    staged = set.intersection(*(closures[name] for name in stages)) - shared
    table = [(EVERY_KEY, sorted(shared), WHY[EVERY_KEY]), (EVERY_STAGE, sorted(staged), WHY[EVERY_STAGE])]
    for name, closure in closures.items():
        table.append((name, sorted(closure - shared - (staged if name in stages else set())), WHY[name]))
    return table


def readme_table() -> str:
    """The README's table (between the KEYS markers)."""
    lines = ["| key | modules (beyond the rows above it) | why they can change the output |", "|---|---|---|"]
    for name, modules, why in rows():
        lines.append(f"| {name} | {', '.join(f'`{m}`' for m in modules)} | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(readme_table(), end="")
