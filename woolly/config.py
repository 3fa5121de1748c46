"""Server configuration: `woolly.config.yaml`, overridden by `WOOLLY_*` variables, then flags.

The sections follow the API reference (server, models, inference, cache, logging,
security), plus `distributed` (multi-process JAX, `woolly.runtime.distributed`). Values are
validated by msgspec; a bad file is one clear `InvalidRequest`.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta

from woolly.errors import InvalidRequest

# Bounds of the numeric settings, declared with them (a value out of bounds is one line naming it).
Positive = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Seconds = Annotated[int, Meta(ge=1)]


class Cors(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    origins: list[str] = msgspec.field(default_factory=list)


class ServerSection(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"      # loopback unless configured otherwise
    port: Annotated[int, Meta(ge=1, le=65535)] = 11434
    cors: Cors = msgspec.field(default_factory=Cors)
    max_body_bytes: Positive = 1 << 20
    max_queue: NonNegative = 64          # requests waiting for a slot before "busy"
    max_json_depth: Annotated[int, Meta(ge=1, le=10_000)] = 64     # arrays/objects nested deeper in a request body: 400 (HTTP) / error event (WS)
    max_prompt_bytes: Positive = 256 * 1024     # UTF-8 bytes of a prompt (chat: all contents; embeddings: all inputs)
    max_embedding_tokens: Positive = 32768      # tokens in one embeddings request, all inputs together
    embedding_chunk_tokens: Positive = 4096     # padded tokens per embedding pass (its memory grows with this)
    template_timeout: Annotated[float, Meta(gt=0.0)] = 2.0          # seconds a chat template may take to render
    template_memory_bytes: Positive = 512 << 20  # address space of each template-rendering process
    template_workers: Positive = 2              # template-rendering processes (renders at once)
    # Host names accepted besides loopback's (DNS rebinding). Bound to loopback: only localhost,
    # 127.0.0.1, [::1] and these; bound elsewhere: any Host unless this is set. "*": any.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    max_connections: Positive = 512   # open connections (HTTP and WebSocket); more get 503 and are closed
    header_timeout: Seconds = 10     # seconds for a request's head to arrive, from connect or the last response
    body_timeout: Seconds = 30       # seconds a request body may stall between two reads
    keep_alive_timeout: Seconds = 5  # seconds an idle keep-alive connection stays open


class ModelsSection(msgspec.Struct, forbid_unknown_fields=True):
    directory: str | None = None  # default: ~/.cache/woolly/models (WOOLLY_MODELS_DIR)
    preload: list[str] = msgspec.field(default_factory=list)
    default: str = "smollm2-135m-instruct"
    max_loaded: Positive = 3           # models resident at once (Ollama's default); least recently used idle one goes
    keep_alive: str | float = "5m"  # idle time before a model loaded on demand is unloaded (-1: never, 0: at once)


class Gpu(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    layers: int = 0


class Cpu(msgspec.Struct, forbid_unknown_fields=True):
    threads: Positive | None = None


class InferenceSection(msgspec.Struct, forbid_unknown_fields=True):
    max_batch_size: Annotated[int, Meta(ge=1, le=256)] = 4            # as EngineConfig's bounds
    max_sequence_length: Annotated[int, Meta(ge=16, le=1 << 20)] = 2048
    residency: Literal["dense", "quantized"] = "quantized"   # dense: the exact mode, f32 weights
    kv_cache_type: Literal["f32", "f16", "bf16"] = "f16"   # KV cache element (llama.cpp --cache-type-k/v; f16 its default)
    tensor_parallel: Positive = 1   # devices the heads and MLP are split over (docs/sharding.md)
    data_parallel: Positive = 1     # devices the slots are split over
    gpu: Gpu = msgspec.field(default_factory=Gpu)
    cpu: Cpu = msgspec.field(default_factory=Cpu)


class CacheSection(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = True
    size: NonNegative = 1 << 30   # bytes of KV snapshots kept
    ttl: NonNegative = 3600       # seconds


class LoggingSection(msgspec.Struct, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "text"
    output: str = "stdout"       # stdout, stderr, or a file path
    repeat_limit: Positive = 10       # the same warning or error at most this often a minute; the rest are counted


class RateLimiting(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    requests_per_minute: Positive = 60


class SecuritySection(msgspec.Struct, forbid_unknown_fields=True):
    api_key_required: bool = False
    api_keys: list[str] = msgspec.field(default_factory=list)
    rate_limiting: RateLimiting = msgspec.field(default_factory=RateLimiting)


class DistributedSection(msgspec.Struct, forbid_unknown_fields=True):
    """`jax.distributed.initialize`'s arguments. Off unless coordinator_address is set; then every
    process gets the same address and process count, and its own process_id (0 runs the coordinator)."""
    coordinator_address: str | None = None     # "host:port" of process 0, reachable from every process
    num_processes: Positive | None = None
    process_id: NonNegative | None = None
    local_device_ids: list[int] | None = None  # this process's devices (GPUs); default: all it sees
    initialization_timeout: Seconds = 300          # seconds to wait for every process to join
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"   # cross-process collectives on the CPU backend

    @property
    def enabled(self) -> bool:
        return self.coordinator_address is not None


class WoollyConfig(msgspec.Struct, forbid_unknown_fields=True):
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    models: ModelsSection = msgspec.field(default_factory=ModelsSection)
    inference: InferenceSection = msgspec.field(default_factory=InferenceSection)
    cache: CacheSection = msgspec.field(default_factory=CacheSection)
    logging: LoggingSection = msgspec.field(default_factory=LoggingSection)
    security: SecuritySection = msgspec.field(default_factory=SecuritySection)
    distributed: DistributedSection = msgspec.field(default_factory=DistributedSection)


# WOOLLY_* variable -> (path in the config, type)
ENV_VARS: dict[str, tuple[tuple[str, ...], type]] = {
    "WOOLLY_HOST": (("server", "host"), str),
    "WOOLLY_PORT": (("server", "port"), int),
    "WOOLLY_MAX_JSON_DEPTH": (("server", "max_json_depth"), int),
    "WOOLLY_MAX_PROMPT_BYTES": (("server", "max_prompt_bytes"), int),
    "WOOLLY_MAX_EMBEDDING_TOKENS": (("server", "max_embedding_tokens"), int),
    "WOOLLY_TEMPLATE_TIMEOUT": (("server", "template_timeout"), float),
    "WOOLLY_TEMPLATE_MEMORY_BYTES": (("server", "template_memory_bytes"), int),
    "WOOLLY_ALLOWED_HOSTS": (("server", "allowed_hosts"), list),
    "WOOLLY_MAX_CONNECTIONS": (("server", "max_connections"), int),
    "WOOLLY_HEADER_TIMEOUT": (("server", "header_timeout"), int),
    "WOOLLY_BODY_TIMEOUT": (("server", "body_timeout"), int),
    "WOOLLY_MODELS_DIR": (("models", "directory"), str),
    "WOOLLY_MAX_LOADED_MODELS": (("models", "max_loaded"), int),
    "WOOLLY_KEEP_ALIVE": (("models", "keep_alive"), str),
    "WOOLLY_GPU_ENABLED": (("inference", "gpu", "enabled"), bool),
    "WOOLLY_GPU_LAYERS": (("inference", "gpu", "layers"), int),
    "WOOLLY_CPU_THREADS": (("inference", "cpu", "threads"), int),
    "WOOLLY_KV_CACHE_TYPE": (("inference", "kv_cache_type"), str),
    "WOOLLY_TENSOR_PARALLEL": (("inference", "tensor_parallel"), int),
    "WOOLLY_DATA_PARALLEL": (("inference", "data_parallel"), int),
    "WOOLLY_LOG_LEVEL": (("logging", "level"), str),
    "WOOLLY_LOG_FORMAT": (("logging", "format"), str),
    "WOOLLY_API_KEY": (("security", "api_keys"), list),
    "WOOLLY_RATE_LIMIT": (("security", "rate_limiting", "requests_per_minute"), int),
    "WOOLLY_COORDINATOR_ADDRESS": (("distributed", "coordinator_address"), str),
    "WOOLLY_NUM_PROCESSES": (("distributed", "num_processes"), int),
    "WOOLLY_PROCESS_ID": (("distributed", "process_id"), int),
    "WOOLLY_LOCAL_DEVICE_IDS": (("distributed", "local_device_ids"), list),
    "WOOLLY_DISTRIBUTED_TIMEOUT": (("distributed", "initialization_timeout"), int),
    "WOOLLY_CPU_COLLECTIVES": (("distributed", "cpu_collectives"), str),
}


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _parse_env(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise InvalidRequest(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in ("1", "true", "yes", "on")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise InvalidRequest(f"{name} must be an integer, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise InvalidRequest(f"{name} must be a number, got {raw!r}") from None
    if kind is list:
        return [k for k in (s.strip() for s in raw.split(",")) if k]
    return raw


_BOUND = re.compile(r"Expected `\w+` ([<>]=?) (\S+) - at `\$\.([\w.]+)`")
_ENV_OF = {".".join(path): name for name, (path, _) in ENV_VARS.items()}


def _config_error(message: str, tree: dict) -> str:
    """msgspec's message for a value out of its declared bounds -> one line naming the setting
    (and its variable), the bound and the value; any other message as msgspec words it."""
    m = _BOUND.fullmatch(message)
    if not m:
        return f"invalid configuration: {message}"
    op, bound, path = m.groups()
    value: Any = tree
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    env = f" (set by {_ENV_OF[path]} too)" if path in _ENV_OF else ""
    return f"{path} must be {op} {bound.removesuffix('.0')}, got {value!r}{env}"


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                overrides: dict[tuple[str, ...], Any] | None = None) -> WoollyConfig:
    """File (if any; default ./woolly.config.yaml when present), then environment, then flags."""
    env = os.environ if env is None else env
    tree: dict = {}
    if path is None and Path("woolly.config.yaml").is_file():
        path = "woolly.config.yaml"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InvalidRequest(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise InvalidRequest(f"config file {p.name} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise InvalidRequest(f"config file {p.name} must be a mapping of sections")
    for name, (cpath, kind) in ENV_VARS.items():
        if env.get(name):
            _set(tree, cpath, _parse_env(name, env[name], kind))
    for cpath, value in (overrides or {}).items():
        if value is not None:
            _set(tree, cpath, value)
    try:
        cfg = msgspec.convert(tree, WoollyConfig, strict=False)
    except msgspec.ValidationError as e:
        raise InvalidRequest(_config_error(str(e), tree)) from None
    if cfg.security.api_keys and not cfg.security.api_key_required and env.get("WOOLLY_API_KEY"):
        cfg.security.api_key_required = True  # setting a key means wanting it checked
    if cfg.security.api_key_required and not cfg.security.api_keys:
        raise InvalidRequest("security.api_key_required is set but no key is configured (WOOLLY_API_KEY)")
    parse_keep_alive(cfg.models.keep_alive, "models.keep_alive")
    check_distributed(cfg.distributed)
    return cfg


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_KEEP_ALIVE = 10 * 365 * 86400.0   # longer than this reads as "forever"


def parse_keep_alive(value: str | float, what: str = "keep_alive") -> float | None:
    """Ollama's keep_alive -> seconds, or None for "keep until unloaded".

    A number is seconds; a string is a number or a Go duration ("5m", "1h30m", "-1s");
    negative keeps the model loaded, 0 unloads it as soon as the request ends.
    """
    hint = f"{what} must be a duration (\"5m\", \"1h30m\", \"30s\") or seconds; -1 keeps the model, 0 unloads it"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidRequest(hint, details={"field": what})
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text)
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise InvalidRequest(f"{hint}; got {text[:40]!r}", details={"field": what}) from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise InvalidRequest(hint, details={"field": what})
    return None if seconds < 0 or seconds > MAX_KEEP_ALIVE else seconds


def split_address(address: str) -> tuple[str, int]:
    """"host:port" (an IPv6 host in brackets: "[::1]:1234") -> (host, port), or InvalidRequest."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(f"distributed.coordinator_address must be host:port with a port in 1..65535, got {address!r}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise InvalidRequest(f"distributed.coordinator_address: write an IPv6 host in brackets ([::1]:1234), got {address!r}")
    return host, int(port)


def check_distributed(d: DistributedSection) -> None:
    """The distributed section must be all there (or all absent) and consistent."""
    if not d.enabled:
        if d.num_processes is not None or d.process_id is not None or d.local_device_ids is not None:
            raise InvalidRequest("distributed.coordinator_address (WOOLLY_COORDINATOR_ADDRESS) is required "
                                 "when num_processes, process_id or local_device_ids is set")
        return
    split_address(d.coordinator_address)
    if d.num_processes is None or d.process_id is None:
        raise InvalidRequest("distributed: num_processes (WOOLLY_NUM_PROCESSES) and process_id (WOOLLY_PROCESS_ID) "
                             "are required with a coordinator_address")
    if d.num_processes < 1:
        raise InvalidRequest(f"distributed.num_processes must be >= 1, got {d.num_processes}")
    if not 0 <= d.process_id < d.num_processes:
        raise InvalidRequest(f"distributed.process_id must be in 0..{d.num_processes - 1} "
                             f"(num_processes {d.num_processes}), got {d.process_id}")
    if d.local_device_ids is not None:
        if not d.local_device_ids or min(d.local_device_ids) < 0 or len(set(d.local_device_ids)) != len(d.local_device_ids):
            raise InvalidRequest(f"distributed.local_device_ids must be distinct device ids >= 0, got {d.local_device_ids}")
    if d.initialization_timeout < 1:
        raise InvalidRequest(f"distributed.initialization_timeout must be >= 1 second, got {d.initialization_timeout}")
