"""Training across nodes (grove.train.nodes): two torchrun agents on this machine meet through
c10d rendezvous on 127.0.0.1, one as the main node (the train stage), one as a follower
(`python -m tasks.train.follower`); the adapter equals a one-node job's on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
from seaweedfs import free_port
from grove.store import ArtifactStore


def run_train(config: Path) -> dict:
    """load_data -> template_corpus -> train in this process; the train entry's summary."""
    from flows.config import load_config
    from grove.stage import RunContext, stage_run
    from tasks.load_data import load_data
    from tasks.template_corpus import template_corpus
    from tasks.train import train

    cfg = load_config(config)
    with stage_run(RunContext(store=ArtifactStore(cfg.artifact_root), device="cpu",
                              checkpoint_steps=cfg.checkpoint_steps)):
        ref = train(cfg.train, template_corpus(cfg.corpus, load_data(cfg.data), cfg.model), cfg.model)
    return ref.summary


def adapter_in(root: Path) -> dict:
    from safetensors.torch import load_file

    store = ArtifactStore(str(root))
    [entry] = store.entries("train")
    return load_file(store.materialize(entry) / "adapter" / "adapter_model.safetensors")


def ddp_config(tiny_model, tone_copy, tmp_path, name: str, train: dict) -> dict:
    raw = tiny_config(tiny_model, tone_copy, tmp_path / name, tmp_path / f"{name}-out")
    raw["passes"] = {"lora": raw["passes"]["lora"]}
    raw["passes"]["lora"]["config"]["training_args"].update(max_steps=6, per_device_train_batch_size=4)
    raw["passes"]["lora"]["config"]["lora_dropout"] = 0.1  # the RNG must agree too
    raw["grove"].update(device="cpu", checkpoint_steps=2, train=train)
    return raw


def test_two_nodes_of_one_process_train_the_adapter_of_one_node_of_two(tiny_model, tone_copy, tmp_path,
                                                                       write_config, monkeypatch):
    import torch

    two_nodes = write_config(ddp_config(tiny_model, tone_copy, tmp_path, "nodes", {"nodes": 2, "processes": 1}),
                             "nodes.json")
    monkeypatch.setenv("GROVE_TRAIN_RDZV_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("GROVE_TRAIN_RDZV_ID", "test-two-nodes")
    # the follower learns the endpoint from the job the main node publishes in the store
    follower_env = {k: v for k, v in os.environ.items() if k != "GROVE_TRAIN_RDZV_ENDPOINT"}
    follower = subprocess.Popen([sys.executable, "-m", "tasks.train.follower", "--store", str(tmp_path / "nodes")],
                                cwd=ROOT, env=follower_env, stdout=open(tmp_path / "follower.log", "w"),
                                stderr=subprocess.STDOUT)
    try:
        summary = run_train(two_nodes)
        assert follower.wait(timeout=120) == 0, (tmp_path / "follower.log").read_text()[-3000:]
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert summary["nodes"] == 2 and summary["processes"] == 1 and summary["steps"] == 6
    assert ArtifactStore(str(tmp_path / "nodes")).get_json("jobs/train/test-two-nodes.json") is None, \
        "the main node withdraws the job once it ends"

    one_node = write_config(ddp_config(tiny_model, tone_copy, tmp_path, "one", {"processes": 2}), "one.json")
    assert run_train(one_node)["nodes"] == 1
    expected, got = adapter_in(tmp_path / "one"), adapter_in(tmp_path / "nodes")
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=0, atol=1e-6), name


def test_the_main_node_defaults_to_its_own_address_and_a_bad_endpoint_is_named(monkeypatch):
    import socket

    from tasks.train.nodes import DEFAULT_PORT, Rendezvous

    monkeypatch.delenv("GROVE_TRAIN_RDZV_ENDPOINT", raising=False)
    assert Rendezvous.from_env().endpoint == f"{socket.gethostbyname(socket.gethostname())}:{DEFAULT_PORT}"
    assert Rendezvous.from_env(published="10.0.0.7:29400").endpoint == "10.0.0.7:29400"
    monkeypatch.setenv("GROVE_TRAIN_RDZV_ENDPOINT", "main-host")
    with pytest.raises(ValueError, match="GROVE_TRAIN_RDZV_ENDPOINT: 'main-host' is not host:port"):
        Rendezvous.from_env()


@pytest.mark.parametrize("nodes", [0, "2", 1.5])
def test_train_nodes_must_be_a_whole_number_of_at_least_one(tiny_model, tone_copy, tmp_path, nodes):
    from flows.config import ConfigError, parse_config

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["grove"]["train"] = {"nodes": nodes}
    with pytest.raises(ConfigError, match=r"grove\.train\.nodes"):
        parse_config(raw, base_dir=tmp_path)
