"""The README a newcomer navigates: every link of its table of contents (and bench/README.md's) lands
on a heading as GitHub anchors it, every section is listed, and links to other files of the repo
point at files that exist."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md"]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (backticks, dots, colons,
    parentheses), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(doc: Path) -> list[tuple[int, str]]:
    """(level, text) of each heading, parsed as markdown (a `# comment` in a code block is none)."""
    tokens = MarkdownIt("commonmark").enable("table").parse(doc.read_text())
    return [(int(tok.tag[1]), tokens[i + 1].content) for i, tok in enumerate(tokens) if tok.type == "heading_open"]


def anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, text in headings(doc):
        base = github_anchor(text)
        out.add(base if base not in seen else f"{base}-{seen[base]}")  # GitHub numbers repeats -1, -2...
        seen[base] = seen.get(base, 0) + 1
    return out


def links(doc: Path) -> list[str]:
    tokens = MarkdownIt("commonmark").enable("table").parse(doc.read_text())
    return [child.attrs["href"] for tok in tokens if tok.type == "inline"
            for child in tok.children or [] if child.type == "link_open"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_link_lands_on_a_heading_or_a_file_of_the_repo(doc):
    local = [href for href in links(doc) if not re.match(r"^[a-z]+:", href)]
    assert any(href.startswith("#") for href in local), f"{doc.name} has no table of contents"
    for href in local:
        path, _, anchor = href.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        assert target.exists(), f"{doc.relative_to(ROOT)}: link to {href}: no such file"
        if anchor:
            assert anchor in anchors(target), f"{doc.relative_to(ROOT)}: link {href}: no heading with that anchor"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_section_is_in_the_table_of_contents(doc):
    listed = {href[1:] for href in links(doc) if href.startswith("#")}
    sections = [text for level, text in headings(doc)[1:] if level == 2 and text not in ("Contents", )]
    missing = [text for text in sections if github_anchor(text) not in listed
               and not text.startswith("The two commands")]
    assert not missing, f"{doc.relative_to(ROOT)}: sections missing from its Contents: {missing}"


def test_the_readme_starts_with_what_grove_is_and_the_two_commands():
    levels = headings(ROOT / "README.md")
    assert levels[0] == (1, "Grove") and levels[1][1].startswith("The two commands") and levels[2][1] == "Contents"
    makefile = (ROOT / "Makefile").read_text()
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    for target in re.findall(r"^make (\w+)", block, re.M):
        assert re.search(rf"^{target}:", makefile, re.M), f"the README's `make {target}` is no Makefile target"
    assert re.findall(r"^make (\w+)", block, re.M) == ["demo", "test"]


def grove_keys(model, prefix: str = "") -> set[str]:
    """Every key path the `grove` section's pydantic model accepts: nested sections are walked, a
    dict of sections (`retries`) is `retries.<stage>.KEY`; a list's items (candidates) are not."""
    import types
    from typing import Union, get_args, get_origin

    from pydantic import BaseModel

    keys = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.add(path)
        union = get_origin(field.annotation) in (Union, types.UnionType)
        for arg in get_args(field.annotation) if union else (field.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                keys |= grove_keys(arg, f"{path}.")
            elif get_origin(arg) is dict and isinstance(get_args(arg)[1], type) and issubclass(get_args(arg)[1], BaseModel):
                keys |= grove_keys(get_args(arg)[1], f"{path}.<stage>.")
    return keys


def documented_grove_keys() -> set[str]:
    """The keys the README's `grove` table names: `evaluate.max_new_tokens` / `batch_size` names
    evaluate.max_new_tokens and evaluate.batch_size."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The `grove` section\n", 1)[1].split("\n#", 1)[0]
    keys = set()
    for row in re.findall(r"^\| (`[^|]+)\|", section, re.M):
        first, *rest = [part.strip().strip("`") for part in row.split("/")]
        parent = first.rpartition(".")[0]
        keys |= {first, *(f"{parent}.{key}" if parent else key for key in rest)}
    return keys


def test_every_key_of_the_grove_section_is_in_the_readme_and_no_other():
    from flows.config.grove_section import GroveSection

    accepted, documented = grove_keys(GroveSection), documented_grove_keys()
    leaves = {key for key in accepted if not any(other.startswith(f"{key}.") for other in accepted)}
    assert not leaves - documented, f"grove keys the README's grove table does not document: {sorted(leaves - documented)}"
    assert not documented - accepted, f"the README documents grove keys Grove does not accept: {sorted(documented - accepted)}"


def own_data_commands() -> list[list[str]]:
    """The shell commands of the README's own-data section, as written (comments dropped)."""
    section = (ROOT / "README.md").read_text().split("## Your own data: a worked example\n", 1)[1].split("\n## ", 1)[0]
    tokens = MarkdownIt("commonmark").parse(section)
    blocks = [tok.content for tok in tokens if tok.type == "fence" and tok.info == "bash"]
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.strip()]


def test_the_own_data_example_runs_as_written(tiny_model, prefect_api, tmp_path):
    """Every command of "Your own data" runs through the real CLI, in a folder laid out as the
    repository (its configs/). validate and stages run as written, on the bundled model; from
    `grove run` on, each command that takes a config also gets `input_model.model_path=<tiny model>`
    and the search turned off, so the whole flow runs in seconds rather than minutes (the bundled
    model's run is measured in the README). The CSV's split, the shipped folder and the plan after a
    run are what the section says."""
    commands = own_data_commands()
    assert [c[:2] for c in commands] == [["grove", "validate"], ["grove", "stages"], ["grove", "run"],
                                         ["grove", "predict"], ["grove", "stages"]]
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    tiny = [f"input_model.model_path={tiny_model}", "grove.quantization_search.enabled=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    said, after_run = [], False
    for command in commands:
        after_run = after_run or command[1] == "run"
        if after_run and "--config" in command:
            command = command + tiny
        done = subprocess.run([sys.executable, "-m", "flows.cli", *command[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(command)}:\n{done.stdout}\n{done.stderr}"
        said.append((command, done.stdout))
    (_, validated), (_, planned), (_, ran), (_, answered), (_, replanned) = said
    assert validated.startswith("ok: configs/smollm2-capitals.json") and "configs/data/capitals.csv" in validated
    stage_rows = lambda out: dict(re.findall(r"^(\w+) +(hit|miss) ", out, re.M))  # noqa: E731
    assert stage_rows(planned) == {stage: "miss" for stage in ("load_data", "template_corpus", "train", "evaluate",
                                                              "merge_adapters", "build_onnx", "benchmark")}
    assert "48 train / 16 eval rows" in ran, ran
    model = tmp_path / "grove-output" / "smollm2-capitals" / "model"
    assert (model / "grove_prompt.json").is_file() and answered.count("\n") == 1, answered  # one question, one answer
    replanned = stage_rows(replanned)
    assert replanned["load_data"] == replanned["template_corpus"] == "hit" and replanned["train"] == "miss", replanned


def checking_commands() -> list[list[str]]:
    """`grove validate` and `grove stages` lines of the README outside the own-data section (which
    has a test of its own) that name a config the repository has: cheap, so run as written."""
    readme = (ROOT / "README.md").read_text()
    own_data = readme.split("## Your own data: a worked example\n", 1)[1].split("\n## ", 1)[0]
    blocks = [tok.content for tok in MarkdownIt("commonmark").parse(readme.replace(own_data, ""))
              if tok.type == "fence" and tok.info == "bash"]
    commands = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()
                if re.match(r"grove (validate|stages) ", line)]
    return [c for c in commands if "|" not in c and ">" not in c
            and (ROOT / c[c.index("--config" if "--config" in c else "-c") + 1]).is_file()]


def test_the_readmes_checking_commands_run_as_written(tmp_path):
    commands = checking_commands()
    assert any("--resolved" in c for c in commands), commands  # the override example, at least
    shutil.copytree(ROOT / "configs", tmp_path / "configs")

    def grove(command: list[str]) -> str:
        done = subprocess.run([sys.executable, "-m", "flows.cli", *command[1:]], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{shlex.join(command)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    for command in commands:
        said = grove(command)
        overrides = [word for word in command[2:] if re.match(r"^[\w.]+=", word)]
        if "--resolved" in command and overrides:
            plain = [word for word in command if word not in overrides]
            assert json.loads(said) != json.loads(grove(plain)), f"{overrides} changed nothing in --resolved"
