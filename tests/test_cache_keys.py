"""A stage's cache key covers all of its code and only its code; its entry records its settings.

Key completeness runs on a copy of grove/, tasks/ and flows/: every stage's code digest is
computed in a fresh process with the copy first on sys.path, one helper module gets a comment
line, and exactly the stages whose imports reach that module get a new digest. Which stages
those are comes from concrete expectations and, independently of grove/cache.py, from the
standard library's modulefinder (which follows the imports in the compiled bytecode).
Code that cannot change an output (gc, the Prefect UI, progress lines, the CLI, run records)
is in no key, the shared adapter base's key holds only what builds the base, and the README's
table of which module is in which key is the one flows/key_table.py computes from the code.
"""

from __future__ import annotations

import ast
import json
import modulefinder
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config

PACKAGES = ("grove", "tasks", "flows")
STAGE_MODULES = {"load_data": "tasks.load_data", "template_corpus": "tasks.template_corpus",
                 "train": "tasks.train.stage", "evaluate": "tasks.evaluate", "merge_adapters": "tasks.merge_adapters",
                 "build_onnx": "tasks.build_onnx.stage", "benchmark": "tasks.benchmark.stage"}
ADAPTER_BASE = "tasks.build_onnx.base"  # keys the int4 base every fine-tune of one base model shares

# Run in a fresh interpreter: argv[1] the project copy, argv[2] {stage: module} as JSON.
DIGESTS = """
import json, sys, time
from grove import cache
assert cache.__file__.startswith(sys.argv[1]), f"grove came from {cache.__file__}, not the copy"
start = time.process_time()
digests = {stage: cache.code_digest(module) for stage, module in json.loads(sys.argv[2]).items()}
print(json.dumps({"digests": digests, "cpu_seconds": time.process_time() - start}))
"""


def digests_of(root: Path, modules: dict[str, str] = STAGE_MODULES) -> dict:
    done = subprocess.run([sys.executable, "-c", DIGESTS, str(root), json.dumps(modules)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def stages_reaching(root: Path, module: str) -> set[str]:
    """The stages whose modules import `module`, directly or not, by modulefinder."""
    found = set()
    for stage, stage_module in STAGE_MODULES.items():
        finder = modulefinder.ModuleFinder(path=[str(root)])  # project modules only
        finder.import_hook(stage_module)
        if module in finder.modules:
            found.add(stage)
    return found


def append_comment(root: Path, module: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + "\n# an edit that changes no behaviour\n")


@pytest.fixture
def project_copy(tmp_path) -> Path:
    root = tmp_path / "project"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_every_stage_is_keyed_by_the_digest_of_its_own_module():
    from grove.cache import code_digest
    from grove.stage import STAGES
    from tasks.benchmark import benchmark
    from tasks.build_onnx.stage import build_onnx
    from tasks.evaluate import evaluate
    from tasks.load_data import load_data
    from tasks.merge_adapters import merge_adapters
    from tasks.template_corpus import template_corpus
    from tasks.train import train

    stages = (load_data, template_corpus, train, evaluate, merge_adapters, build_onnx, benchmark)
    assert tuple(STAGE_MODULES) == STAGES == tuple(s.stage_name for s in stages)
    for stage in stages:
        assert stage.__module__ == STAGE_MODULES[stage.stage_name]
        assert stage.code_version == code_digest(stage.__module__)
    assert len({stage.code_version for stage in stages}) == len(stages)


def test_the_walk_finds_what_modulefinder_finds(project_copy):
    """The ast walk and the bytecode walk agree on every key's project imports."""
    listing = "import json, sys\nfrom grove import cache\nprint(json.dumps({m: cache.import_closure(m) " \
              "for m in json.loads(sys.argv[1])}))"
    keyed = [*STAGE_MODULES.values(), ADAPTER_BASE]
    done = subprocess.run([sys.executable, "-c", listing, json.dumps(keyed)],
                          cwd=project_copy, env={**os.environ, "PYTHONPATH": str(project_copy)},
                          capture_output=True, text=True, check=True)
    closures = json.loads(done.stdout)
    for module in keyed:
        finder = modulefinder.ModuleFinder(path=[str(project_copy)])
        finder.import_hook(module)
        assert set(closures[module]) == {m for m in finder.modules if m.split(".")[0] in PACKAGES}, module


@pytest.mark.parametrize("helper, expected", [
    ("grove.textdata", {"template_corpus", "train", "evaluate", "build_onnx", "benchmark"}),
    ("tasks.build_onnx.quantization", {"build_onnx"}),
    ("tasks.benchmark.worker", {"benchmark"}),  # run as `python -m`, never imported at run time
    ("tasks.train.ddp", {"train"}),  # likewise, under torchrun
    ("grove.engines", {"evaluate", "build_onnx", "benchmark"}),  # benchmark: inside the worker's functions
    ("tasks.train.cuda_setup", {"train"}),  # imported only inside fit's functions
    ("grove.store.artifacts", set(STAGE_MODULES)),
])
def test_editing_a_module_changes_exactly_the_keys_of_the_stages_that_import_it(project_copy, helper, expected):
    assert stages_reaching(project_copy, helper) == expected
    before = digests_of(project_copy)
    assert before["cpu_seconds"] < 0.2, "all seven digests must cost a cached rerun next to nothing"
    append_comment(project_copy, helper)
    after = digests_of(project_copy)
    changed = {stage for stage, digest in before["digests"].items() if after["digests"][stage] != digest}
    assert changed == expected


# ---- what cannot change an output is in no key (issue 19: an edit to gc or the UI reran every stage) --------
# Run in a fresh interpreter in the copy: argv[1] {key: module}, argv[2] [module, ...]. Each module
# gets a comment line alone (restored after): the digests before, and after each edit.
EACH_EDIT = """
import json, sys
from grove import cache

keys, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])


def digests():
    for cached in (cache.direct_imports, cache.import_closure, cache.code_digest):
        cached.cache_clear()
    return {name: cache.code_digest(module) for name, module in keys.items()}


before, after = digests(), {}
for module in modules:
    path = cache.source_file(module)
    source = path.read_bytes()
    path.write_bytes(source + b"\\n# an edit that changes no behaviour\\n")
    try:
        after[module] = digests()
    finally:
        path.write_bytes(source)
print(json.dumps({"before": before, "after": after}))
"""


def keys_changed_by_each_edit(root: Path, keys: dict[str, str], modules: list[str]) -> dict[str, set[str]]:
    """{module: the keys whose code digest one comment line in it changes}, one module at a time."""
    done = subprocess.run([sys.executable, "-c", EACH_EDIT, json.dumps(keys), json.dumps(modules)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return {module: {k for k, v in digests.items() if v != result["before"][k]}
            for module, digests in result["after"].items()}


def test_editing_cleanup_display_or_cli_code_changes_no_key(project_copy):
    """gc, the Prefect UI artifacts, progress lines, run records, the CLI and the flow: no stage's
    code version (nor the adapter base's) moves when one of them changes."""
    modules = ["grove.store.gc", "flows.ui", "flows.progress_lines", "flows.runs", "flows.report",
               "flows.cli.run_commands", "flows.cli.store_commands", "flows.optimize", "flows.key_table"]
    changed = keys_changed_by_each_edit(project_copy, {**STAGE_MODULES, "adapter base": ADAPTER_BASE}, modules)
    assert changed == {module: set() for module in modules}


def test_the_adapter_base_key_covers_what_builds_the_base_not_the_build_stage(project_copy):
    """Every fine-tune of a base model shares one stored base: an edit to the build stage alone
    (scoring, the search, shipping the run's adapter, the stage decorator) reruns build_onnx,
    never the base build; an edit to what builds the base rebuilds it."""
    stage_only = ["tasks.build_onnx.stage", "tasks.build_onnx.search", "tasks.build_onnx.ship", "grove.scoring",
                  "grove.shipped", "grove.served", "grove.engines", "grove.stage"]
    builds_base = ["tasks.build_onnx.base", "tasks.build_onnx.builder", "tasks.build_onnx.adapters",
                   "tasks.build_onnx.quantization", "grove.models"]
    changed = keys_changed_by_each_edit(project_copy, {"build_onnx": STAGE_MODULES["build_onnx"],
                                                       "adapter base": ADAPTER_BASE}, stage_only + builds_base)
    assert changed == {**{m: {"build_onnx"} for m in stage_only},
                       **{m: {"build_onnx", "adapter base"} for m in builds_base}}


def _import_path(closure_of, start: str, target: str) -> list[str]:
    """One chain of imports from `start` to `target` (breadth first), to say how it got in."""
    from grove.cache import direct_imports

    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        if path[-1] == target:
            return path
        for name in direct_imports(path[-1]):
            if name not in seen:
                seen.add(name)
                paths.append(path + [name])
    return [start, "...", target]


def display_or_cleanup_in_keys(keys: dict[str, str]) -> list[str]:
    """Why each module that cannot change an output but is in a key must not be (empty: none is)."""
    from grove.cache import import_closure
    from flows.key_table import OUTSIDE_EVERY_KEY

    problems = []
    for name, module in keys.items():
        for reached in import_closure(module):
            for outside, why in OUTSIDE_EVERY_KEY.items():
                if reached == outside or reached.startswith(outside + "."):
                    chain = " -> ".join(_import_path(import_closure, module, reached))
                    problems.append(f"{reached} is in the cache key of {name} ({chain}): {why}. In a key, "
                                    f"every edit to it would rerun {name}")
    return problems


def test_no_key_reaches_display_or_cleanup_code():
    from flows.key_table import KEYS

    assert set(KEYS) == {*STAGE_MODULES, "adapter base"} and KEYS["adapter base"] == ADAPTER_BASE
    problems = display_or_cleanup_in_keys(KEYS)
    assert not problems, "\n".join(problems)


def test_a_new_import_of_display_code_into_a_stage_is_caught_with_the_reason(project_copy):
    """The guard above, shown failing: merge_adapters importing the UI module (in a copy)."""
    path = project_copy / "tasks" / "merge_adapters.py"
    path.write_text(path.read_text() + "\n\ndef _show():\n    from flows.ui import artifact_key\n")
    done = subprocess.run([sys.executable, "-c", "import json, sys\nfrom test_cache_keys import "
                           "display_or_cleanup_in_keys\nprint(json.dumps(display_or_cleanup_in_keys("
                           "{'merge_adapters': 'tasks.merge_adapters'})))"], cwd=project_copy, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": f"{project_copy}{os.pathsep}{ROOT / 'tests'}"},
                          check=True)
    problems = json.loads(done.stdout)
    assert any(p.startswith("flows.ui is in the cache key of merge_adapters (tasks.merge_adapters -> flows.ui)")
               and "Prefect UI artifacts" in p and "rerun merge_adapters" in p for p in problems), problems


def test_the_readme_says_which_modules_are_in_which_key():
    from flows.key_table import readme_table

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- KEYS:START (python -m flows.key_table) -->\n", "<!-- KEYS:END -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0] == readme_table(), \
        "README's key table is out of date: paste the output of `python -m flows.key_table`"


def test_a_module_imported_only_inside_a_function_is_in_the_key(project_copy):
    (project_copy / "tasks" / "probe.py").write_text(
        "def run():\n    from . import probe_helper\n\n    return probe_helper.VALUE\n")
    (project_copy / "tasks" / "probe_helper.py").write_text("VALUE = 1\n")
    probe = {"probe": "tasks.probe"}
    before = digests_of(project_copy, probe)["digests"]["probe"]
    append_comment(project_copy, "tasks.merge_adapters")  # not imported: no change
    assert digests_of(project_copy, probe)["digests"]["probe"] == before
    append_comment(project_copy, "tasks.probe_helper")
    assert digests_of(project_copy, probe)["digests"]["probe"] != before


def _python_files(*packages: str):
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def _imported(tree: ast.AST, package: str) -> set[str]:
    """Every module name an import statement in the tree can bind (absolute and relative)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_no_runtime_module_imports_bench_code():
    """bench/ holds measurement-only code: keeping it out of grove/ and tasks/ keeps it out of every key."""
    for path in _python_files("grove", "tasks"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        imported = _imported(ast.parse(path.read_text()), module.rpartition(".")[0])
        assert not [name for name in imported if name.split(".")[0] == "bench"], f"{path} imports bench code"


def test_a_module_named_in_a_string_is_also_imported():
    """A `-m package.module` command spelled as a string would escape the key: such a module
    must be imported by the file that names it (and the command built from its __name__)."""
    for path in _python_files("grove", "tasks"):
        tree = ast.parse(path.read_text())
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                 and isinstance(node.value, str) and node.value.split(".")[0] in PACKAGES and "." in node.value
                 and ROOT.joinpath(*node.value.split(".")).with_suffix(".py").is_file()}
        named.discard(module)  # its own logger
        assert named <= _imported(tree, package), f"{path} names {sorted(named)} without importing them"


def test_a_stored_entry_records_the_settings_it_was_built_with(tiny_model, tone_copy, tmp_path, write_config):
    from flows.config import load_config
    from grove.cache import machine_key, stage_key
    from grove.stage import RunContext, stage_run
    from grove.store import ArtifactStore
    from tasks.load_data import load_data
    from tasks.template_corpus import template_corpus

    cfg = load_config(write_config(tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")))
    with stage_run(RunContext(store=ArtifactStore(cfg.artifact_root))):
        data = load_data(cfg.data)
        corpus = template_corpus(cfg.corpus, data, cfg.model)
    manifest = json.loads((tmp_path / "store" / "entries" / "template_corpus" / corpus.key / "MANIFEST.json")
                          .read_text())
    recorded = manifest["meta"]["settings"]
    assert recorded == {"corpus": cfg.corpus.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                        "data": {"artifact": "load_data", "content": data.content}}
    settings_key = stage_key("template_corpus", template_corpus.code_version, recorded)
    assert manifest["meta"]["settings_key"] == settings_key
    assert machine_key(settings_key, manifest["meta"]["machine"]) == corpus.key
    assert manifest["meta"]["code_version"] == template_corpus.code_version


def test_recorded_settings_hold_no_secret(tiny_model, tone_copy, tmp_path):
    from flows.config import parse_config
    from grove.cache import settings_record, stage_key

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["passes"]["lora"]["config"]["training_args"]["hub_token"] = "hf_not_a_real_token"
    cfg = parse_config(raw, base_dir=tmp_path)
    assert "hf_not_a_real_token" not in json.dumps(settings_record({"settings": cfg.train, "model": cfg.model}))

    signed = cfg.data.model_copy(update={"files": ["https://reader:pa55word@data.example/a.json?X-Amz-Signature=5ig"]})
    record = json.dumps(settings_record({"data": signed}))
    assert "pa55word" not in record and "5ig" not in record and "https://data.example/a.json" in record
    resigned = signed.model_copy(update={"files": ["https://reader:pa55word@data.example/a.json?X-Amz-Signature=x"]})
    assert stage_key("load_data", "v", {"data": signed}) != stage_key("load_data", "v", {"data": resigned})
