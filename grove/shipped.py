"""The shipped ONNX folder's own way to be used: its prompt template and the greedy call.

build_onnx writes `grove_prompt.json` and `README.md` next to the model, scores the model
through `ShippedModel` (onnxruntime-genai's tokenizer on the rendered prompt, greedy
generation), and `grove predict` runs the same class: the accuracy Grove reports is the
accuracy of the snippet in README.md. The prompt template starts with the bos token's
text, because training put bos before every example and onnxruntime-genai's
Tokenizer.encode adds no special tokens itself (it does turn their text into their ids).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from grove.errors import UserError
from grove.textdata import answer_of, split_template

PROMPT_FILE = "grove_prompt.json"
README_FILE = "README.md"


def prompt_spec(template: str, label_col: str, max_new_tokens: int, tokenizer,
                whole_answer: bool = False) -> dict[str, Any]:
    """What grove_prompt.json holds: everything a caller needs to ask the model as it was scored.
    `whole_answer` (free-text answers): the answer is all the generated text, not its first line."""
    prompt_part, answer_part = split_template(template, label_col)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return {"prompt_template": (tokenizer.bos_token or "") + prompt_part,
            "fields": placeholders(prompt_part), "label_col": label_col, "training_template": template,
            "max_new_tokens": max_new_tokens, "eos_token_ids": sorted(eos),
            "whole_answer": whole_answer,
            "answer": "the generated text, stripped" if whole_answer else
                      "the generated text up to its first line break, stripped"}


def placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_prompt(spec: dict[str, Any], row: dict[str, Any]) -> str:
    """The prompt text for one row; a missing field is a one-line error naming it."""
    missing = [name for name in spec["fields"] if name not in row]
    if missing:
        raise UserError(f"the prompt template needs {', '.join(missing)} (fields: {', '.join(spec['fields'])})")
    return spec["prompt_template"].format(**{k: "" if v is None else v for k, v in row.items()})


def write_shipped_files(folder: Path, spec: dict[str, Any]) -> None:
    (folder / PROMPT_FILE).write_text(json.dumps(spec, indent=1))
    (folder / README_FILE).write_text(readme(spec))


def readme(spec: dict[str, Any]) -> str:
    example = ", ".join(f'{name}="..."' for name in spec["fields"])
    answer = "text" if spec.get("whole_answer") else 'text.split("\\n", 1)[0].strip()'
    return f"""# Grove model

Built by Grove; scored on its eval split with exactly the code below (grove/shipped.py).
From the command line: `grove predict --model THIS_FOLDER "text"`.

```python
import json
import os
import onnxruntime_genai as og

folder = "THIS_FOLDER"
spec = json.load(open(f"{{folder}}/{PROMPT_FILE}"))
config = og.Config(folder)
# every core (onnxruntime-genai runs a CPU model on one thread otherwise), as Grove measured it
config.overlay(json.dumps({{"model": {{"decoder": {{"session_options": {{
    "intra_op_num_threads": len(os.sched_getaffinity(0))}}}}}}}}))
model = og.Model(config)
tokenizer = og.Tokenizer(model)
ids = tokenizer.encode(spec["prompt_template"].format({example}))
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(ids) + spec["max_new_tokens"])
generator = og.Generator(model, params)
generator.append_tokens(ids)
tokens = []
while not generator.is_done() and len(tokens) < spec["max_new_tokens"]:
    generator.generate_next_token()
    token = int(generator.get_next_tokens()[0])
    if token in spec["eos_token_ids"]:
        break
    tokens.append(token)
text = tokenizer.decode(tokens).strip()
answer = {answer}
```
"""


class ShippedModel:
    """A shipped folder, asked as README.md's snippet asks it."""

    def __init__(self, folder: Path, engine=None, spec: dict[str, Any] | None = None):
        """`spec`: the prompt spec when it is not in the folder (a base served with an adapter)."""
        from grove.engines import OnnxEngine

        self.folder = Path(folder)
        spec_file = self.folder / PROMPT_FILE
        if spec is None and not spec_file.is_file():
            raise UserError(f"{self.folder} has no {PROMPT_FILE}: not a model folder Grove shipped "
                             f"(point --model at <output_dir>/<name>/model)")
        self.spec = spec if spec is not None else json.loads(spec_file.read_text())
        self.engine = engine or OnnxEngine(self.folder, set(self.spec["eos_token_ids"]))
        self.tokenizer = self.engine.og.Tokenizer(self.engine.model)

    def encode(self, row: dict[str, Any]) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(render_prompt(self.spec, row))]

    def answer_ids(self, ids: list[int]) -> list[int]:
        return self.engine.generate(ids, self.spec["max_new_tokens"])

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        """The generated text (eos is never among the tokens); scoring takes its first line."""
        return self.tokenizer.decode(tokens) if tokens else ""

    def answer(self, row: dict[str, Any]) -> str:
        # a folder shipped without the key was scored on its first line
        return answer_of(self.decode(self.answer_ids(self.encode(row))), self.spec.get("whole_answer", False))

    def row_from_text(self, text: str) -> dict[str, Any]:
        """A single text fills the template's one field; a template with several needs --field."""
        if len(self.spec["fields"]) != 1:
            raise UserError(f"the prompt template has fields {', '.join(self.spec['fields'])}: "
                             f"give each with --field NAME=VALUE")
        return {self.spec["fields"][0]: text}
