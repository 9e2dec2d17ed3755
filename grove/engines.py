"""Greedy generation through the two runtimes Grove compares: transformers and onnxruntime-genai.

Both take the same prompt token ids (tokenized once by the HF tokenizer) and return the
new token ids, so accuracy and speed are measured on identical inputs. Decoding always
goes through the HF tokenizer: onnxruntime-genai's decode stops at the first invalid
UTF-8 token.

On a GPU: the PyTorch engine runs wherever the model's weights are; the ONNX engine runs
on the execution provider the builder wrote into genai_config.json (`cuda` needs the
onnxruntime-genai-cuda and onnxruntime-gpu packages, which replace the CPU builds).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Generation:
    tokens: list[int]
    first_token_seconds: float = 0.0  # prompt processing + first new token
    total_seconds: float = 0.0
    token_times: list[float] = field(default_factory=list)


class HfEngine:
    def __init__(self, model, pad_id: int, eos_ids: set[int]):
        self.model, self.pad_id, self.eos_ids = model, pad_id, eos_ids

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy, left-padded batch generation; stops each row at eos."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.pad_id, eos_token_id=list(self.eos_ids))
        return [_until_eos(row[width:].tolist(), self.eos_ids) for row in out]

    def generate_timed(self, prompt: list[int], max_new_tokens: int) -> Generation:
        """One prompt, every new token forced (no early stop), timed token by token."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        device = next(self.model.parameters()).device
        started = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([prompt]).to(device), max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                      logits_processor=LogitsProcessorList([Stamp()]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait before stopping the clock
        ended = time.perf_counter()
        return Generation(out[0, len(prompt):].tolist(), stamps[0] - started if stamps else 0.0,
                          ended - started, [s - started for s in stamps])


def session_options(folder: Path) -> dict:
    """The decoder's session_options in a builder output folder's genai_config.json."""
    config = json.loads((Path(folder) / "genai_config.json").read_text())
    return config["model"]["decoder"].get("session_options", {})


def onnx_providers(folder: Path, options: dict | None = None) -> list[str]:
    """The execution providers genai_config.json asks for (empty: onnxruntime's CPU provider)."""
    options = session_options(folder) if options is None else options
    return [name for entry in options.get("provider_options", []) for name in entry]


def cpu_threads_config(og, folder: Path, options: dict | None = None):
    """The model's og.Config, running on every core this process may use. onnxruntime-genai
    otherwise ran a CPU model on one thread here (65 decode tokens/s against 104 with both cores
    of this machine, where PyTorch uses both). A genai_config.json that sets the thread count
    itself is left as it is. The shipped folder's README snippet does the same (grove/shipped.py)."""
    options = session_options(folder) if options is None else options
    config = og.Config(str(folder))
    if "intra_op_num_threads" not in options:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": len(os.sched_getaffinity(0))}}}}))
    return config


class OnnxEngine:
    """onnxruntime-genai model from a builder output folder, on the provider it was built for."""

    def __init__(self, folder: Path, eos_ids: set[int], adapter: Path | None = None):
        """`adapter`: an .onnx_adapter file for a base built with LoRA slots, active on every
        generation (served as onnxruntime-genai serves it: og.Adapters + set_active_adapter)."""
        options = session_options(folder)
        cuda = "cuda" in onnx_providers(folder, options)
        if cuda:
            # onnxruntime's CUDA provider library needs the CUDA and cuDNN libraries already
            # loaded (they are not on the loader's path in a pip install); importing torch
            # loads the matching ones, as onnxruntime's own documentation recommends.
            import torch  # noqa: F401
        import onnxruntime_genai as og

        self.og = og
        try:
            self.model = og.Model(cpu_threads_config(og, folder, options) if not cuda else str(folder))
        except Exception as exc:
            if cuda and "cuda" in str(exc).lower():
                raise RuntimeError(
                    f"{folder} is built for CUDA but onnxruntime-genai could not use it ({exc}); a CUDA "
                    f"model needs a GPU and the CUDA builds of the runtimes: pip uninstall -y onnxruntime "
                    f"onnxruntime-genai && pip install onnxruntime-gpu==1.31.1 onnxruntime-genai-cuda==0.18.0"
                ) from exc
            raise
        self.device_type = str(self.model.device_type).lower()  # "cpu" or "cuda": where it runs
        self.eos_ids = eos_ids
        self.adapters = None
        if adapter is not None:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter), "active")

    def _generator(self, prompt: list[int], max_new_tokens: int, force: bool):
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": len(prompt) + max_new_tokens, "do_sample": False}
        if force:
            options["min_length"] = len(prompt) + max_new_tokens
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "active")
        return generator

    def generate(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        generator = self._generator(prompt, max_new_tokens, force=False)
        generator.append_tokens(prompt)
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_ids:
                break
            tokens.append(token)
        return tokens

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return [self.generate(p, max_new_tokens) for p in prompts]

    def logits(self, rows: list[list[int]], pad_id: int = 0):
        """Teacher forcing: float32 logits [rows, width, vocab] at every position of each row, as
        served (the adapter active). Rows are right-padded: a causal model's logits at a row's own
        positions never see the padding after them (onnxruntime-genai 0.18 passes an all-ones
        attention mask, so left padding would change them; checked against PyTorch, to 1e-6 on an
        fp32 build, in tests/test_teacher_forcing.py)."""
        import numpy as np

        width = max(len(r) for r in rows)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=width, batch_size=len(rows))
        generator = self.og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "active")
        generator.append_tokens(np.array([r + [pad_id] * (width - len(r)) for r in rows], dtype=np.int32))
        return np.asarray(generator.get_output("logits"), dtype=np.float32)

    def generate_timed(self, prompt: list[int], max_new_tokens: int) -> Generation:
        started = time.perf_counter()
        generator = self._generator(prompt, max_new_tokens, force=True)
        generator.append_tokens(prompt)
        tokens, stamps = [], []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            stamps.append(time.perf_counter() - started)
        return Generation(tokens, stamps[0] if stamps else 0.0, time.perf_counter() - started, stamps)


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:index]
    return tokens


def eos_ids_of(tokenizer, model_config=None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    return ids
