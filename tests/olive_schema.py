"""Olive's config key names, read from an unpacked olive-ai wheel with `ast` (no import: Olive's
dependencies are not installed here), into tests/data/olive<version>_keys.json.

Made with (CI cannot download Olive; the JSON files are committed):
    pip download olive-ai==0.13.0 --no-deps -d /tmp/olive013 && unzip -q /tmp/olive013/*.whl -d /tmp/o13
    pip download olive-ai==0.6.2 --no-deps -d /tmp/olive06 && unzip -q /tmp/olive06/*.whl -d /tmp/o06
    python tests/olive_schema.py /tmp/o13 tests/data/olive013_keys.json
    python tests/olive_schema.py /tmp/o06 tests/data/olive06_keys.json
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


if __name__ == "__main__":
    keys = snapshot(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    print(f"{sys.argv[2]}: {sum(map(len, keys.values()))} keys in {len(keys)} sections")
