"""Run settings: CLI flags > environment > TOML config file > defaults, as frozen values.

Tokens are read here and kept only in memory; nothing in this module's objects that holds a
token prints it (``repr=False``).
"""

from __future__ import annotations

import os
import random
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batch_runner.errors import ConfigError
from batch_runner.store.location import DbLocation, location

DEFAULT_MAX_INFLIGHT = 2  # one prompt running, one waiting in the server's queue
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_SILENCE_TIMEOUT_S = 60.0  # a prompt silent this long is checked over HTTP
DEFAULT_ENDPOINT_TIMEOUT_S = 600.0  # how long submitted prompts wait for a lost endpoint
TOKEN_ENV = "BATCH_RUNNER_TOKEN"


@dataclass(frozen=True)
class EndpointSettings:
    url: str
    token: str | None = field(default=None, repr=False)
    max_inflight: int = DEFAULT_MAX_INFLIGHT

    @property
    def name(self) -> str:
        return urlsplit(self.url).netloc or self.url


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by ``max_delay``."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay: float = 2.0
    max_delay: float = 300.0
    #: how long a retry waits for another endpoint before the one it failed on may take it
    elsewhere_grace: float = 10.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, attempt - 1))
        return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Timeouts:
    silence: float = DEFAULT_SILENCE_TIMEOUT_S
    endpoint: float = DEFAULT_ENDPOINT_TIMEOUT_S
    grace: float = 3600.0  # graceful stop waits this long for in-flight prompts


@dataclass(frozen=True)
class RunSettings:
    manifest: Path
    #: an SQLite file, or a PostgreSQL URL shared by several runners
    db: DbLocation
    output_dir: Path
    endpoints: tuple[EndpointSettings, ...]
    workflow: Path | None = None
    bindings: Mapping[str, str] = field(default_factory=dict)
    preset: str | None = None  #: None keeps the workflow's own default
    retry: RetryPolicy = RetryPolicy()
    timeouts: Timeouts = Timeouts()
    skip_invalid: bool = False
    rerun_changed: bool = False
    verify_video: bool = True
    #: shared database only: this runner's name among the runners of the run
    runner_name: str | None = None
    #: shared database only: a runner silent this long is presumed gone and its jobs adopted
    takeover_after: float = 60.0
    #: serve Prometheus metrics on this loopback port
    metrics_port: int | None = None
    #: a saved /object_info answer, for converting UI-format workflows without a server
    object_info: Path | None = None
    #: ``FILE[:strength]`` LoRAs for the built-in template's high- and low-noise experts
    lora_high: str | None = None
    lora_low: str | None = None
    #: the built-in template in its 4-step set-up (``wan22-fast4``)
    fast4: bool = False
    #: bindings per workflow named in the manifest's ``workflow`` column
    workflow_bindings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def default_db(manifest: Path) -> Path:
    """The run database sits beside the manifest, so the same command resumes the same run."""
    return manifest.with_name(manifest.name + ".batch.sqlite")


def default_output_dir(manifest: Path) -> Path:
    return manifest.parent / "outputs" / manifest.stem


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"endpoint {url!r} is not an http(s) URL such as http://127.0.0.1:8188")
    return url


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


_TOP_KEYS = {
    "db",
    "output_dir",
    "workflow",
    "preset",
    "max_attempts",
    "bindings",
    "endpoints",
    "max_inflight",
    "silence_timeout",
    "endpoint_timeout",
    "object_info",
    "lora_high",
    "lora_low",
    "fast4",
    "workflows",
}
_ENDPOINT_KEYS = {"url", "token", "token_env", "max_inflight"}


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} must be a whole number of at least 1, not {value!r}")
    return value


def endpoints_from_toml(
    items: Sequence[Any], source: Path, default_inflight: int
) -> list[EndpointSettings]:
    result = []
    for i, item in enumerate(items, 1):
        where = f"{source}: endpoints[{i}]"
        if not isinstance(item, dict) or "url" not in item:
            raise ConfigError(f"{where} needs a url")
        unknown = set(item) - _ENDPOINT_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        token = item.get("token")
        if "token_env" in item:
            token = os.environ.get(str(item["token_env"]))
            if token is None:
                raise ConfigError(f"{where}: environment variable {item['token_env']} is not set")
        inflight = _positive_int(
            item.get("max_inflight", default_inflight), f"{where}.max_inflight"
        )
        result.append(EndpointSettings(normalise_url(str(item["url"])), token, inflight))
    return result


def build_settings(
    manifest: Path,
    *,
    config_file: Path | None = None,
    endpoints: Sequence[str] = (),
    token: str | None = None,
    db: DbLocation | None = None,
    output_dir: Path | None = None,
    workflow: Path | None = None,
    binds: Sequence[str] = (),
    preset: str | None = None,
    max_inflight: int | None = None,
    max_attempts: int | None = None,
    skip_invalid: bool = False,
    rerun_changed: bool = False,
    object_info: Path | None = None,
    lora_high: str | None = None,
    lora_low: str | None = None,
    fast4: bool = False,
) -> RunSettings:
    """Merge flags, environment and the TOML file into one RunSettings (unset: not given)."""
    file_cfg = load_toml(config_file) if config_file else {}
    unknown = set(file_cfg) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{config_file}: unknown key(s) {', '.join(sorted(unknown))}")
    base = config_file.parent if config_file else Path.cwd()

    def file_path(key: str) -> Path | None:
        return (base / str(file_cfg[key])) if key in file_cfg else None

    inflight = max_inflight or _positive_int(
        file_cfg.get("max_inflight", DEFAULT_MAX_INFLIGHT), "max_inflight"
    )
    token = token or os.environ.get(TOKEN_ENV)
    eps: list[EndpointSettings]
    if endpoints:
        eps = [EndpointSettings(normalise_url(u), token, inflight) for u in endpoints]
    else:
        eps = endpoints_from_toml(file_cfg.get("endpoints", []), config_file or base, inflight)
    seen = set()
    for ep in eps:
        if ep.url in seen:
            raise ConfigError(f"endpoint {ep.url} is listed twice")
        seen.add(ep.url)

    bindings: dict[str, str] = {str(k): str(v) for k, v in file_cfg.get("bindings", {}).items()}
    for bind in binds:
        name, sep, target = bind.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ConfigError(
                f"--bind {bind!r} must look like FIELD=NODE.INPUT, e.g. prompt=6.text"
            )
        bindings[name.strip()] = target.strip()

    attempts = max_attempts or _positive_int(
        file_cfg.get("max_attempts", DEFAULT_MAX_ATTEMPTS), "max_attempts"
    )
    timeouts = Timeouts(
        silence=float(file_cfg.get("silence_timeout", DEFAULT_SILENCE_TIMEOUT_S)),
        endpoint=float(file_cfg.get("endpoint_timeout", DEFAULT_ENDPOINT_TIMEOUT_S)),
    )
    manifest = manifest.absolute()
    return RunSettings(
        manifest=manifest,
        # Absolute, so stored output paths and exports mean the same from any directory.
        db=_absolute(db or _db_from_file(file_cfg, base) or default_db(manifest)),
        output_dir=(
            output_dir or file_path("output_dir") or default_output_dir(manifest)
        ).absolute(),
        endpoints=tuple(eps),
        workflow=workflow or file_path("workflow"),
        bindings=bindings,
        preset=preset or (str(file_cfg["preset"]) if "preset" in file_cfg else None),
        retry=RetryPolicy(max_attempts=attempts),
        timeouts=timeouts,
        skip_invalid=skip_invalid,
        rerun_changed=rerun_changed,
        object_info=object_info or file_path("object_info"),
        lora_high=lora_high or _optional_str(file_cfg, "lora_high"),
        lora_low=lora_low or _optional_str(file_cfg, "lora_low"),
        fast4=fast4 or file_cfg.get("fast4") is True,
        workflow_bindings=_workflow_bindings(file_cfg.get("workflows", {}), config_file or base),
    )


def _db_from_file(file_cfg: Mapping[str, Any], base: Path) -> DbLocation | None:
    if "db" not in file_cfg:
        return None
    given = location(str(file_cfg["db"]))
    return base / given if isinstance(given, Path) else given


def _absolute(db: DbLocation) -> DbLocation:
    return db.absolute() if isinstance(db, Path) else db


def _optional_str(file_cfg: Mapping[str, Any], key: str) -> str | None:
    return str(file_cfg[key]) if key in file_cfg else None


def _workflow_bindings(table: Any, source: Path) -> dict[str, Mapping[str, Any]]:
    """``[workflows."NAME".bindings]`` tables: bindings of the workflows rows name."""
    if not isinstance(table, dict):
        raise ConfigError(f'{source}: workflows must be a table of [workflows."NAME"] tables')
    out: dict[str, Mapping[str, Any]] = {}
    for name, entry in table.items():
        where = f'{source}: [workflows."{name}"]'
        if not isinstance(entry, dict) or set(entry) - {"bindings"}:
            raise ConfigError(f"{where} may only hold a bindings table")
        bindings = entry.get("bindings", {})
        if not isinstance(bindings, dict):
            raise ConfigError(f'{where}.bindings must be a table of FIELD = "NODE.INPUT"')
        out[str(name)] = bindings
    return out
