"""Training across nodes: one torchrun job over `grove.train.nodes` machines, c10d rendezvous.

The main node is the one whose Prefect task runs the train stage. It publishes the job (settings,
the corpus's digest, the checkpoint to resume from) in the artifact store under the rendezvous
id, with the rendezvous endpoint (its own address unless one is set), then starts its own
torchrun. Every other node runs a follower:

    python -m tasks.train.follower --store s3://bucket/grove

which waits for that job, takes the endpoint from it (or from its environment), fetches the corpus (and checkpoint) from the store and starts the same
torchrun; c10d assigns the node ranks, so no node needs to be told its rank. Only the main node
stores: each node's first process saves (transformers' save_on_each_node), so the main node
holds the adapter and the checkpoints whichever global rank c10d gave it, and the stage stores
them as for one node. A follower keeps nothing.

Environment (the same on every node):
  GROVE_TRAIN_RDZV_ENDPOINT  host:port of the rendezvous, reachable from every node; default: the main
                             node's address (its hostname's IP, as in a Kubernetes pod) and port 29400
  GROVE_TRAIN_RDZV_ID        names the job; default grove-train (one job at a time per id and store)
  GROVE_TRAIN_RDZV_TIMEOUT   seconds a follower waits for the job and torchrun for all nodes; default 900
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.train import ddp  # the program torchrun runs on every node

log = logging.getLogger("grove.train")

ENDPOINT_VAR, ID_VAR, TIMEOUT_VAR = "GROVE_TRAIN_RDZV_ENDPOINT", "GROVE_TRAIN_RDZV_ID", "GROVE_TRAIN_RDZV_TIMEOUT"
DEFAULT_ID, DEFAULT_TIMEOUT, DEFAULT_PORT = "grove-train", 900.0, 29400


@dataclass(frozen=True)
class Rendezvous:
    endpoint: str
    id: str = DEFAULT_ID
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_env(cls, published: str | None = None) -> "Rendezvous":
        """The main node's (published None: the endpoint defaults to this host) or a follower's
        (the endpoint the main node published, unless the environment sets one)."""
        endpoint = os.environ.get(ENDPOINT_VAR, "").strip() or published or ""
        if not endpoint:
            import socket

            endpoint = f"{socket.gethostbyname(socket.gethostname())}:{DEFAULT_PORT}"
        if ":" not in endpoint:
            raise ValueError(f"{ENDPOINT_VAR}: {endpoint!r} is not host:port")
        try:
            timeout = float(os.environ.get(TIMEOUT_VAR, DEFAULT_TIMEOUT))
        except ValueError:
            raise ValueError(f"{TIMEOUT_VAR}: not a number of seconds") from None
        return cls(endpoint, os.environ.get(ID_VAR, DEFAULT_ID).strip() or DEFAULT_ID, timeout)

    @property
    def job_path(self) -> str:
        """Where the main node publishes the job in the artifact store."""
        return f"jobs/train/{self.id}.json"


def torchrun_command(processes: int, *program: str, nodes: int = 1, rendezvous: Rendezvous | None = None) -> list[str]:
    """How the train stage launches a data-parallel job: standalone on one node, else through
    c10d rendezvous (bench/gpu_ddp_scaling.py launches the same way)."""
    launch = ["--standalone"]
    if nodes > 1:
        if rendezvous is None:
            raise ValueError("a multi-node job needs a rendezvous")
        launch = [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous.endpoint}",
                  f"--rdzv-id={rendezvous.id}", f"--rdzv-conf=join_timeout={int(rendezvous.timeout)}",
                  "--max-restarts=0"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={processes}", *program]


def follow(store_root: str, credentials_block: str | None = None, poll: float = 1.0) -> int:
    """One follower node: wait for the job the main node publishes, run its share, return torchrun's exit code."""
    from grove.machine import worker_environment
    from grove.settings import TrainSettings
    from grove.store import ArtifactStore

    store = ArtifactStore(store_root, credentials_block)
    waiting = Rendezvous.from_env(published="unknown:0")  # the id and timeout; the endpoint comes with the job
    deadline = time.monotonic() + waiting.timeout
    while (job := store.get_json(waiting.job_path)) is None:
        if time.monotonic() > deadline:
            log.error("no job %s in %s after %.0f s", waiting.job_path, store.root, waiting.timeout)
            return 2
        time.sleep(poll)
    rendezvous = Rendezvous.from_env(published=job["endpoint"])
    corpus = store.by_digest(job["corpus_digest"])
    if corpus is None:
        log.error("job %s: corpus %s missing from %s", rendezvous.id, job["corpus_digest"][:12], store.root)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="grove-train-follower-"))
    try:
        resume = None
        if job["resume_step"] is not None:
            checkpoint = store.latest_checkpoint("train", job["key"])
            if checkpoint is None or checkpoint.step != job["resume_step"]:
                log.error("job %s resumes from step %s, which is not the newest checkpoint in %s",
                          rendezvous.id, job["resume_step"], store.root)
                return 2
            resume = str(store.materialize(checkpoint))
        request = {**job["request"], "corpus": str(store.materialize(corpus)), "out": str(workdir / "out"),
                   "workdir": str(workdir), "resume": resume}
        (workdir / "request.json").write_text(json.dumps(request))
        settings = TrainSettings.model_validate(request["settings"])
        command = torchrun_command(settings.processes, "-m", ddp.__name__, str(workdir / "request.json"),
                                   nodes=settings.nodes, rendezvous=rendezvous)
        log.info("follower: %s", " ".join(command))
        return subprocess.run(command, env=worker_environment(), check=False).returncode
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
