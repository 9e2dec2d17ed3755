"""How many cache keys one edit invalidates: every project module in some key, edited alone.

    python bench/key_misses.py [--tree PATH]

PATH (default: this checkout) holds grove/, tasks/ and flows/; they are copied to a temporary
folder, so an older tree can be measured too (`git archive <commit> grove tasks flows | tar -x
-C PATH`). The keys are found in the source, not listed here: every `@grove_stage("name")`
function's module, and every module that keys something by `code_digest(__name__)` (the
shared adapter base). Each module in the union of their import closures gets a comment line
appended, alone; the keys whose code digest changes are its misses (computed by that tree's
own grove/cache.py, in one child process). "Beyond importers" counts the misses of keys
whose own code (the key's module and the modules of its tasks/ package) does not import the
edited module directly (nor is in it): what issue 19 measured as over-invalidation (44 modules edited
one at a time -> 75 stage misses).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grove", "tasks", "flows")

# Run in the copy: argv[1] {key name: module} as JSON. Edits each module of the keys' closures alone.
MEASURE = r"""
import json, sys
from pathlib import Path
from grove import cache

keys = json.loads(sys.argv[1])


def digests():
    for cached in (cache.direct_imports, cache.import_closure, cache.code_digest):
        cached.cache_clear()
    return {name: cache.code_digest(module) for name, module in keys.items()}


def own_code(module):
    parts = module.split(".")
    package = ".".join(parts[:2]) if len(parts) > 2 else None  # tasks.train.stage -> tasks.train
    return [m for m in cache.import_closure(module) if m == module or (package and m.startswith(package + "."))]


before = digests()
closures = {name: cache.import_closure(module) for name, module in keys.items()}
importers = {name: {m for own in own_code(module) for m in (*cache._with_parents(own), *cache.direct_imports(own))}
             for name, module in keys.items()}
modules = sorted(set().union(*closures.values()))
rows = []
for module in modules:
    path = cache.source_file(module)
    source = path.read_bytes()
    path.write_bytes(source + b"\n# an edit that changes no behaviour\n")
    try:
        after = digests()
    finally:
        path.write_bytes(source)
    missed = sorted(name for name in keys if after[name] != before[name])
    beyond = sorted(name for name in missed if module not in importers[name])
    rows.append({"module": module, "misses": missed, "beyond_importers": beyond})
assert digests() == before
print(json.dumps({"closures": closures, "rows": rows}))
"""


def keyed_modules(root: Path) -> dict[str, str]:
    """{key name: module}: each @grove_stage("name") function's module, and each module that
    keys something by code_digest(__name__) (named after the module)."""
    found = {}
    for path in sorted((root / "tasks").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "grove_stage":
                        found[deco.args[0].value] = module
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "code_digest" \
                    and node.args and getattr(node.args[0], "id", "") == "__name__":
                found[f"{module} (adapter base)"] = module
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="a folder holding grove/, tasks/, flows/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="grove-key-misses-") as tmp:
        copy = Path(tmp)
        for package in PACKAGES:
            shutil.copytree(args.tree / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
        keys = keyed_modules(copy)
        done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(keys)], cwd=copy, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(copy)}, check=False)
        if done.returncode:
            sys.exit(done.stderr)
    measured = json.loads(done.stdout)
    rows = measured["rows"]
    print(json.dumps({
        "tree": str(args.tree), "keys": keys,
        "modules_in_some_key": len(rows),
        "misses": sum(len(r["misses"]) for r in rows),
        "misses_beyond_importers": sum(len(r["beyond_importers"]) for r in rows),
        "every_key_misses": sorted(r["module"] for r in rows if len(r["misses"]) == len(keys)),
        "beyond_importers": {r["module"]: r["beyond_importers"] for r in rows if r["beyond_importers"]},
        "closure_sizes": {name: len(closure) for name, closure in measured["closures"].items()},
    }, indent=1))


if __name__ == "__main__":
    main()
