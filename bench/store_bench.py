"""The artifact store against a real S3 server (SeaweedFS), three measurements in one run:

    python bench/store_bench.py [--config configs/smollm2-tone.json] [--skip-runs]

1. cached rerun: the default config run once into a fresh s3:// root, then run again
   unchanged as its own `grove run` process: wall seconds, and bytes moved to and from
   the S3 server (counted by a TCP proxy in front of it). Targets: < 10 s, < 1 MB.
2. footprint: a second run that differs only in ModelBuilder precision (int8); the bytes
   stored under blobs/ against the sum of the distinct files all entries list (target:
   equal, no byte stored twice) and against one full copy per entry (Olive's way).
3. throughput: storing and materializing the merged model folder through the store
   against s3fs's own recursive put/get of the same folder (target: >= 0.8x).

Prints one JSON object. Uses PREFECT_API_URL when set (a running `prefect server start`);
otherwise each `grove run` starts Prefect's temporary server (slower reruns).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from seaweedfs import SeaweedServer, free_port  # noqa: E402


class CountingProxy:
    """A TCP proxy that counts the bytes each way between the clients and the S3 server."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.up = self.down = 0
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _pipe(self, reader, writer, upload: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if upload:
                    self.up += len(data)
                else:
                    self.down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(client_reader, server_writer, True),
                             self._pipe(server_reader, client_writer, False))

    def reset(self) -> int:
        moved, self.up, self.down = self.up + self.down, 0, 0
        return moved


def grove_run(config: Path, env: dict) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"grove run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return round(time.monotonic() - started, 2)


def write_config(raw: dict, root: str, out: Path, precision: str | None = None) -> Path:
    raw = json.loads(json.dumps(raw))
    raw.setdefault("grove", {})["artifact_root"] = root
    raw.setdefault("engine", {})["output_dir"] = str(out)
    for data in raw.get("data_configs", []):
        params = data["load_dataset_config"]["params"]
        params["data_files"] = str((ROOT / params["data_files"]).resolve())
    if precision:
        builder = next(p for p in raw["passes"].values() if p["type"] == "ModelBuilder")
        (builder.get("config", builder))["precision"] = precision
    path = out / f"config-{precision or 'default'}.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    return path


def throughput(store, folder: Path, scratch: Path) -> dict:
    """Store + materialize through ArtifactStore vs s3fs put/get of the same files."""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    raw_prefix = f"{store._base}/raw-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    store.fs.put(str(folder), raw_prefix, recursive=True)
    raw_up = time.monotonic() - started
    started = time.monotonic()
    store.fs.get(raw_prefix, str(scratch / "raw-get"), recursive=True)
    raw_down = time.monotonic() - started
    started = time.monotonic()
    entry = store.put_dir("merge_adapters", f"bench-{uuid.uuid4().hex[:8]}", folder, {})
    ours_up = time.monotonic() - started
    store.materialized = scratch / "views"
    started = time.monotonic()
    store.materialize(entry)
    ours_down = time.monotonic() - started
    return {"bytes": size, "s3fs_upload_MBps": round(size / raw_up / 1e6, 1),
            "store_upload_MBps": round(size / ours_up / 1e6, 1), "upload_ratio": round(raw_up / ours_up, 2),
            "s3fs_download_MBps": round(size / raw_down / 1e6, 1),
            "store_download_MBps": round(size / ours_down / 1e6, 1), "download_ratio": round(raw_down / ours_down, 2),
            "note": "store upload of fresh blobs (a new random-suffix entry of files already stored would skip them)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tone.json"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="grove-store-bench-"))
    server = SeaweedServer(scratch / "weed").start()
    try:
        server.make_bucket("grove-bench")
        proxy = CountingProxy(server.s3_port)
        env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
               "GROVE_HOME": os.environ.get("GROVE_HOME", str(Path.home() / ".cache" / "grove"))}
        os.environ.update(env)
        root = f"s3://grove-bench/{uuid.uuid4().hex[:8]}"
        raw = json.loads(Path(args.config).read_text())
        result: dict = {"command": "python bench/store_bench.py", "store": root,
                        "prefect_api": os.environ.get("PREFECT_API_URL", "ephemeral")}

        cold = grove_run(write_config(raw, root, scratch / "out"), env)
        cold_bytes = proxy.reset()
        # The rerun on a machine that has the final model locally already (the usual case),
        # and on one that must fetch it for output_dir (a fresh worker).
        rerun = grove_run(write_config(raw, root, scratch / "out"), env)
        rerun_bytes = proxy.reset()
        result["cold_run"] = {"seconds": cold, "bytes_moved": cold_bytes}
        result["cached_rerun"] = {"seconds": rerun, "bytes_moved": rerun_bytes,
                                  "targets": {"seconds": 10, "bytes": 1_000_000}}

        grove_run(write_config(raw, root, scratch / "out", precision="int8"), env)
        proxy.reset()
        from grove.store import ArtifactStore

        os.environ["AWS_ENDPOINT_URL"] = server.endpoint  # direct: the proxy only counts the runs
        store = ArtifactStore(root)
        entries = store.entries()
        distinct = {f["sha256"]: f["size"] for e in entries for f in e.files.values()}
        blobs = sum(info["size"] for info in store.fs.find(store._path("blobs"), detail=True).values())
        everything = sum(info["size"] for info in store.fs.find(store._base, detail=True).values())
        result["footprint_after_int4_and_int8_runs"] = {
            "entries": len(entries), "blob_bytes": blobs, "distinct_file_bytes": sum(distinct.values()),
            "one_copy_per_entry_bytes": sum(e.size_bytes for e in entries),
            "all_objects_bytes": everything, "bytes_stored_twice": blobs - sum(distinct.values())}

        merged = store.materialize(store.entries("merge_adapters")[0])
        copy = scratch / "merged-copy"
        shutil.copytree(merged, copy, ignore=shutil.ignore_patterns(".complete"))
        (copy / "salt.txt").write_text(uuid.uuid4().hex)
        for part in copy.rglob("*.safetensors"):  # fresh bytes, so nothing is deduplicated away
            data = bytearray(part.read_bytes())
            data[-1] ^= 0xFF
            os.chmod(part, 0o644)
            part.write_bytes(bytes(data))
        result["throughput_merged_model"] = throughput(store, copy, scratch)
        print(json.dumps(result, indent=1))
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
