"""The only I/O of parsing: listing data locations, digesting data files and adapters, finding
the model (and its config.json). Relative paths resolve against the working directory (as
Olive does), then the config's folder."""

from __future__ import annotations

from pathlib import Path

from flows.config.errors import ConfigError
from grove.settings import ModelSettings

NOT_HERE = "is not supported here, use a local path or s3:// URL"
DATA_FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


class Sources:
    def __init__(self, base_dir: Path, config_dir: Path, credentials_block: str | None = None,
                 list_remote_data: bool = True):
        self.base_dir, self.config_dir = base_dir, config_dir
        self.credentials_block, self.list_remote_data = credentials_block, list_remote_data
        self._remote_access = None
        self._remote_fs: dict[str, object] = {}

    # ---- where things are -------------------------------------------------------------------
    def existing(self, value: str) -> Path | None:
        for root in (self.base_dir, self.config_dir):
            candidate = (root / value).expanduser()
            if candidate.exists():
                return candidate.resolve()
        return None

    def storage(self, value: str) -> str:
        if "://" in value:
            return value.rstrip("/")
        return str((self.base_dir / value).expanduser().resolve())

    def remote_fs(self, url: str):
        """One fresh filesystem per protocol for this parse (one run start), not one per file."""
        from grove.data_files import remote_fs

        protocol = url.split("://", 1)[0]
        if protocol not in self._remote_fs:
            options = self.remote_access().options if protocol == "s3" else {}
            self._remote_fs[protocol] = remote_fs(url, options)[0]
        return self._remote_fs[protocol]

    def remote_access(self):
        """Keys for s3:// data: the same source as the artifact root's (env or the named block)."""
        if self._remote_access is None:
            from grove.credentials import s3_access

            self._remote_access = s3_access(self.credentials_block)
        return self._remote_access

    # ---- the model ------------------------------------------------------------------------------
    def model(self, name: str, where: str, trust_remote_code: bool) -> ModelSettings:
        from grove import models

        try:
            return models.locate_model(name, self.existing, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None

    def adapter(self, value: str, where: str) -> tuple[str, str]:
        """A peft adapter folder: its resolved path and digest (part of every key after train)."""
        from grove.models import folder_digest

        if "://" in value:
            raise ConfigError(where, f"remote adapters {NOT_HERE.split(', ')[0]}; copy the adapter to a local folder")
        folder = self.existing(value)
        if folder is None or not folder.is_dir():
            raise ConfigError(where, f"adapter folder not found: {value} (looked in {self.base_dir} and "
                                     f"{self.config_dir})")
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(where, f"{folder} is not a peft adapter folder (no adapter_config.json)")
        return str(folder), folder_digest(folder)

    # ---- data -----------------------------------------------------------------------------------
    def data_files(self, files, data_dir: str | None, subset: str | None, where: str) -> list[str]:
        """Every file a load_dataset section names, listed now (each run lists again).

        As datasets.load_dataset does, data_dir is the folder relative data_files are found
        under (no data_files: every data file in it); subset is a sub-folder of data_dir."""
        if isinstance(files, dict):
            kind = str(files.get("type", ""))
            if kind.startswith("azureml"):
                raise ConfigError(f"{where}.data_files", f"{kind} data {NOT_HERE}")
            raise ConfigError(f"{where}.data_files", "must be a path, URL or list of them")
        if subset is not None and data_dir is None:
            raise ConfigError(f"{where}.subset", "names a sub-folder of data_dir here; without data_dir it could "
                                                 "only be a hub dataset config, which Grove cannot fetch")
        root = _join(data_dir, subset) if data_dir is not None else None
        if not files and root is None:
            raise ConfigError(f"{where}.data_files", "is required (or give data_dir)")
        locations = [files] if isinstance(files, str) else list(files or [])
        resolved: list[str] = []
        for index, location in enumerate(locations or [""]):
            at = f"{where}.data_files" + ("" if isinstance(files, str) else f"[{index}]") if files else f"{where}.data_dir"
            if root is not None and not location.startswith("/") and "://" not in location:
                location = _join(root, location) if location else root
            resolved += self._list(location, at)
        return list(dict.fromkeys(resolved))

    def _list(self, location: str, at: str) -> list[str]:
        from grove.data_files import DataLocationError, is_remote, list_data_files

        if is_remote(location) and not self.list_remote_data:
            return [location]
        try:
            options = self.remote_access().options if location.startswith("s3://") else {}
            return list_data_files(location, [self.base_dir, self.config_dir], options)
        except DataLocationError as exc:
            raise ConfigError(at, _unsigned(location, str(exc))) from None
        except Exception as exc:  # noqa: BLE001 - a store we cannot read: say which and why
            scrub = self.remote_access().scrub if location.startswith("s3://") else str
            raise ConfigError(at, _unsigned(location, scrub(f"cannot list {location}: {type(exc).__name__}: {exc}"))) \
                from None

    def digest(self, path: str) -> str:
        from grove.data_files import content_digest, is_remote

        if is_remote(path) and not self.list_remote_data:
            return "listed-at-run-start"
        try:
            return content_digest(path, fs=self.remote_fs(path) if is_remote(path) else None)
        except Exception as exc:  # noqa: BLE001 - name the file, never the keys
            scrub = self.remote_access().scrub if path.startswith("s3://") else str
            raise ConfigError("data_files", _unsigned(path, scrub(f"cannot read {path}: {type(exc).__name__}: {exc}"))) \
                from None


def _unsigned(location: str, message: str) -> str:
    """The message without the password or signed query a data URL may carry (the record leaves
    them out too: grove.cache.settings_record)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(location)
        secrets = (parts.password, parts.query)
    except ValueError:
        return message.replace(location, "<the URL>")
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message


def _join(folder: str, name: str | None) -> str:
    if not name:
        return folder
    return f"{folder.rstrip('/')}/{name}"


def format_of(path: str, where: str) -> str:
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix not in DATA_FORMATS:
        raise ConfigError(f"{where}", f"cannot tell the format of {path}; use .json, .jsonl, .csv or .parquet")
    return DATA_FORMATS[suffix]


def file_columns(path: str) -> list[str] | None:
    """Column names from the first record of a local json/jsonl/csv file (None: not checked here).
    A file that is not readable text is named here, by file and line (grove/data_check.py)."""
    from grove.data_check import first_columns

    suffix = path.rsplit(".", 1)[-1].lower()
    return None if "://" in path or suffix not in DATA_FORMATS else first_columns(path, DATA_FORMATS[suffix])
