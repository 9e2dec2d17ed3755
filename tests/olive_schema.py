"""Olive's config key names, read from an unpacked olive-ai wheel with `ast` (no import: Olive's
dependencies are not installed here), into tests/data/olive<version>_keys.json; and every key of
the pass types in the families Grove maps (the fine-tuning passes, the ONNX conversion and
quantization passes) with Olive's description of it, into flows/config/olive_passes.py (the
parser warns about a key of a sibling pass type with its meaning, as Olive ignores it).

Made with (CI cannot download Olive; the output files are committed):
    pip download olive-ai==0.13.0 --no-deps -d /tmp/olive013 && unzip -q /tmp/olive013/*.whl -d /tmp/o13
    pip download olive-ai==0.6.2 --no-deps -d /tmp/olive06 && unzip -q /tmp/olive06/*.whl -d /tmp/o06
    python tests/olive_schema.py /tmp/o13 tests/data/olive013_keys.json
    python tests/olive_schema.py /tmp/o06 tests/data/olive06_keys.json
    python tests/olive_schema.py --passes 0.6=/tmp/o06 0.13=/tmp/o13 flows/config/olive_passes.py
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path


def _tree(root: Path, module: str) -> ast.Module:
    return ast.parse((root / (module.replace(".", "/") + ".py")).read_text())


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def pass_keys(root: Path, module: str, name: str) -> list[str]:
    """Keys of a pass's _default_config: dict literals in it, helpers it calls, and its bases' (super())."""
    tree = _tree(root, module)
    helpers = _functions(tree)
    cls = _class(tree, name)
    keys: set[str] = set()

    def collect(node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Dict):
                keys.update(k.value for k, v in zip(sub.keys, sub.values)
                            if isinstance(k, ast.Constant) and isinstance(v, ast.Call))
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in helpers:
                collect(helpers[sub.func.id])

    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_default_config")
    collect(method)
    if "super()" in ast.unparse(method):
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id != "Pass":
                keys.update(pass_keys(root, module, base.id))
    return sorted(keys)


def fields(root: Path, module: str, name: str) -> list[str]:
    """Annotated class attributes (pydantic fields), with those of same-module bases."""
    tree = _tree(root, module)
    cls = _class(tree, name)
    found = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
             and not ast.unparse(n.annotation).startswith("ClassVar")}
    for base in cls.bases:
        if isinstance(base, ast.Name) and any(isinstance(n, ast.ClassDef) and n.name == base.id for n in tree.body):
            found.update(fields(root, module, base.id))
    return sorted(k for k in found if not k.startswith("_"))


def arguments(root: Path, module: str, function: str, cls: str | None = None) -> list[str]:
    tree = _tree(root, module)
    body = _class(tree, cls).body if cls else tree.body
    func = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == function)
    return sorted(a.arg for a in func.args.args + func.args.kwonlyargs if a.arg not in ("self", "cls", "dataset"))


def snapshot(root: Path) -> dict[str, list[str]]:
    root = root / "olive"
    old = not (root / "version.py").exists()  # 0.6 kept __version__ in __init__.py
    lora = "passes.pytorch.lora"
    result = {
        "passes.LoRA": pass_keys(root, lora, "LoRA"),
        "passes.QLoRA": pass_keys(root, lora, "QLoRA"),
        "passes.MergeAdapterWeights": pass_keys(root, "passes.pytorch.merge_adapter_weights", "MergeAdapterWeights"),
        "passes.ModelBuilder": pass_keys(root, "passes.onnx.model_builder", "ModelBuilder"),
        "passes.*": sorted(set(fields(root, "workflows.run.config" if old else "engine.config", "RunPassConfig"))
                           | set(fields(root, "passes.olive_pass" if old else "passes.pass_config",
                                        "AbstractPassConfig"))),
        "data_configs[]": fields(root, "data.config", "DataConfig"),
        "load_dataset": arguments(root, "data.component.load_dataset", "huggingface_dataset"),
        "pre_process": sorted(set(fields(root, "data.component.text_generation",
                                         "TextGenCorpusParams" if old else "TextGenParams"))),
        "engine": sorted(set(fields(root, "engine.config", "EngineConfig"))
                         | set(fields(root, "workflows.run.config", "RunEngineConfig"))),
        "top": fields(root, "workflows.run.config", "RunConfig"),
        "systems.*": fields(root, "systems.system_config", "SystemConfig"),
    }
    if old:
        result["input_model.config"] = arguments(root, "model.handler.pytorch", "__init__", "PyTorchModelHandler")
        result["input_model.config.hf_config"] = fields(root, "model.config.hf_config", "HfConfig")
    else:
        result["input_model"] = arguments(root, "model.handler.hf", "__init__", "HfModelHandler")
    return result


# pass family -> the modules holding its pass types (every Pass subclass in them, but *Base classes).
# A family is the passes one Grove stage stands for: a key of one of them written in another of
# the family is a real Olive key that that pass ignores.
FAMILIES = {
    "fine-tuning": ("passes.pytorch.lora",),
    "adapter merge": ("passes.pytorch.merge_adapter_weights",),
    "ONNX build": ("passes.onnx.model_builder", "passes.onnx.conversion", "passes.onnx.quantization",
             "passes.onnx.bnb_quantization", "passes.onnx.rtn_quantization", "passes.onnx.hqq_quantization",
             "passes.onnx.kquant_quantization", "passes.onnx.optimum_conversion",
             "passes.onnx.mobius_model_builder"),
}


class _Module:
    """One olive module's top-level definitions, and where its `from olive... import` names live."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.tree = _tree(root, name)
        self.defs: dict[str, ast.AST] = {}
        self.imports: dict[str, str] = {}
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.defs[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                self.defs[node.target.id] = node.value
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("olive."):
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = node.module.removeprefix("olive.")


class _PassParams:
    """Each pass type's keys with Olive's description, read from its _default_config: the dict
    literals of PassConfigParam in it, in the module-level dicts and helper functions it uses
    (its own module's or another olive module's), and its base's when it calls super() or has no
    _default_config of its own."""

    def __init__(self, root: Path):
        self.root, self.modules = root, {}

    def module(self, name: str) -> _Module | None:
        if name not in self.modules:
            exists = (self.root / (name.replace(".", "/") + ".py")).exists()
            self.modules[name] = _Module(self.root, name) if exists else None
        return self.modules[name]

    def resolve(self, module: _Module, name: str) -> tuple[_Module, ast.AST] | None:
        if name in module.defs:
            return module, module.defs[name]
        if name in module.imports:
            other = self.module(module.imports[name])
            if other is not None:
                return self.resolve(other, name)
        return None

    def is_pass(self, module: _Module, cls: ast.ClassDef) -> bool:
        for base in cls.bases:
            if isinstance(base, ast.Name):
                if base.id == "Pass":
                    return True
                found = self.resolve(module, base.id)
                if found and isinstance(found[1], ast.ClassDef) and self.is_pass(*found):
                    return True
        return False

    def passes(self, module_name: str) -> list[str]:
        module = self.module(module_name)
        if module is None:
            return []
        return [n.name for n in module.tree.body if isinstance(n, ast.ClassDef) and not n.name.endswith("Base")
                and self.is_pass(module, n)]

    def params(self, module: _Module, cls: ast.ClassDef) -> dict[str, str]:
        found: dict[str, str] = {}
        method = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_default_config"), None)
        if method is None or "super()" in ast.unparse(method):
            for base in cls.bases:
                resolved = self.resolve(module, base.id) if isinstance(base, ast.Name) else None
                if resolved and isinstance(resolved[1], ast.ClassDef):
                    found.update(self.params(*resolved))
        if method is not None:
            self._collect(module, method, found, set())
        return found

    def _collect(self, module: _Module, node: ast.AST, found: dict[str, str], seen: set) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Dict):
                for key, value in zip(sub.keys, sub.values):
                    if isinstance(key, ast.Constant) and _is_param(value):
                        found[key.value] = _description(value)
            elif isinstance(sub, ast.Assign) and _is_param(sub.value):
                for target in sub.targets:  # config["key"] = PassConfigParam(...)
                    if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                        found[target.slice.value] = _description(sub.value)
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and (module.name, sub.id) not in seen:
                seen.add((module.name, sub.id))  # a helper function or a module-level dict of params
                resolved = self.resolve(module, sub.id)
                if resolved and not isinstance(resolved[1], ast.ClassDef):
                    self._collect(*resolved, found, seen)


def _is_param(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func).endswith("PassConfigParam")


def _description(call: ast.Call) -> str:
    """The first sentence of the param's description, on one line."""
    for keyword in call.keywords:
        if keyword.arg == "description":
            try:
                text = " ".join(str(ast.literal_eval(keyword.value)).split())
            except ValueError:
                return ""
            return text.split(". ")[0].rstrip(".")
    return ""


def pass_families(roots: dict[str, Path]) -> dict[str, dict]:
    """{pass type: {"family": ..., "keys": {key: [description, dialect]}}} over the given Olive versions."""
    result: dict[str, dict] = {}
    for version, root in roots.items():
        reader = _PassParams(root / "olive")
        for family, modules in FAMILIES.items():
            for module_name in modules:
                module = reader.module(module_name)
                for name in reader.passes(module_name):
                    entry = result.setdefault(name, {"family": family, "keys": {}})
                    for key, text in reader.params(module, module.defs[name]).items():
                        old = entry["keys"].get(key)
                        dialect = version if old is None or old[1] == version else "both"
                        entry["keys"][key] = [text or (old[0] if old else ""), dialect]
    for entry in result.values():
        entry["keys"] = dict(sorted(entry["keys"].items()))
    return dict(sorted(result.items()))


def write_passes_module(roots: dict[str, Path], target: Path) -> None:
    passes = pass_families(roots)
    versions = ", ".join(f"{v}: {r}" for v, r in roots.items())
    target.write_text(
        '"""Every key of the Olive pass types in the families Grove maps, with the first sentence of\n'
        "Olive's description and the dialect that has it. Generated by tests/olive_schema.py from the\n"
        f'olive-ai wheels ({", ".join(roots)}); do not edit."""\n\n'
        f"PASSES = {json.dumps(passes, indent=1, ensure_ascii=False)}\n".replace(": null", ": None"))
    print(f"{target}: {len(passes)} pass types, {sum(len(p['keys']) for p in passes.values())} keys ({versions})")


if __name__ == "__main__":
    if sys.argv[1] == "--passes":
        write_passes_module({arg.split("=")[0]: Path(arg.split("=")[1]) for arg in sys.argv[2:-1]}, Path(sys.argv[-1]))
        sys.exit(0)
    keys = snapshot(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    print(f"{sys.argv[2]}: {sum(map(len, keys.values()))} keys in {len(keys)} sections")
