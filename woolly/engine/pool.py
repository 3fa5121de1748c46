"""`ModelPool`: several `Engine`s by model name, loaded on demand, within `max_loaded`, unloaded when idle.

An `Engine` stays the one-model unit; the pool owns one per resident model. Requests take a
lease (`acquire` / `release`) so a model is never evicted or expired while a request of it
runs (nor while its scheduler still has work: a stream outlives its handler's lease). When
a new model needs room, the least recently used idle model is unloaded; when every loaded
model is busy the load is refused with `SERVER_BUSY`. Each model has an idle expiry (Ollama's
keep_alive in seconds, 0 = unload as soon as idle, None = keep; `woolly.config.parse_keep_alive`
reads Ollama's forms); a daemon thread sweeps.
Loads run in the caller's thread (the HTTP layer calls from `asyncio.to_thread`); two
callers wanting the same unloaded model share one load.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from woolly.engine.config import EngineConfig
from woolly.engine.engine import Engine
from woolly.errors import ModelNotFound, ModelNotLoaded, ServerBusy, WoollyError

log = logging.getLogger("woolly.pool")

KEEP = object()   # "leave the model's keep_alive as it is"


@dataclass
class _Entry:
    engine: Engine
    keep_alive: float | None           # seconds idle before unloading; None: until unloaded or evicted
    leases: int = 0                    # requests holding the model now
    idle_since: float = field(default_factory=time.monotonic)

    def busy(self) -> bool:
        load = self.engine.load()
        return self.leases > 0 or load.active > 0 or load.waiting > 0


@dataclass
class _Loading:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class ModelPool:
    def __init__(self, config: EngineConfig | None = None, max_loaded: int = 3,
                 keep_alive: float | None = 300.0, sweep_interval: float = 1.0):
        if max_loaded < 1:
            raise ValueError("max_loaded must be >= 1")
        self.config = config or EngineConfig.default()
        self.max_loaded, self.keep_alive = max_loaded, keep_alive
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()   # least recently used first
        self._loading: dict[str, _Loading] = {}
        self._specs: dict[str, str | os.PathLike] = {}   # name -> what loaded it (a name or an operator's path)
        self._default: str | None = None                  # the model of a request that names none
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(sweep_interval,), name="woolly-pool",
                                         daemon=True)
        self._sweeper.start()

    # -- what is there -----------------------------------------------------------------------
    @property
    def default(self) -> str | None:
        return self._default

    def loaded(self) -> list[tuple[str, Engine]]:
        with self._lock:
            return [(n, e.engine) for n, e in self._entries.items()]

    def loaded_path(self, name: str) -> Path | None:
        with self._lock:
            e = self._entries.get(name)
        return e.engine._model.path if e is not None and e.engine._model is not None else None

    def current(self) -> Engine | None:
        """The default model's engine when it is resident."""
        with self._lock:
            e = self._entries.get(self._default or "")
        return e.engine if e else None

    def available(self) -> list[str]:
        """Names a request may use: pulled models, and models this pool loaded (a path the operator gave)."""
        from woolly.model_store import list_models

        pulled = {r["name"] for r in list_models() if r["pulled"]}
        with self._lock:
            return sorted(pulled | set(self._specs) | set(self._entries))

    # -- loading and leases --------------------------------------------------------------------
    def load(self, spec: str | os.PathLike, keep_alive=KEEP) -> str:
        """Load (or keep) a model by name or path and make it the default; its name.

        An explicit load is kept until unloaded or evicted unless `keep_alive` says otherwise.
        """
        name = _name_of(spec)
        self.acquire(name, None if keep_alive is KEEP else keep_alive, spec=spec)
        self.release(name)
        with self._lock:
            self._default = name
        return name

    def acquire(self, name: str | None, keep_alive=KEEP, spec=None) -> Engine:
        """The engine of `name` (None: the default model), loading it if need be; hold it until `release`."""
        if name is None:
            name = self._default
            if name is None:
                raise ModelNotLoaded("no model is loaded; POST /api/models/load first, or name a model")
        explicit = spec is not None   # a load asked for (kept), not one a request caused (models.keep_alive)
        if name not in self._entries:
            spec = self._resolve(name, spec)   # an unknown name is refused before anything is evicted
        while True:
            with self._lock:
                e = self._entries.get(name)
                if e is not None:
                    e.leases += 1
                    if keep_alive is not KEEP:
                        e.keep_alive = keep_alive
                    self._entries.move_to_end(name)
                    return e.engine
                loading = self._loading.get(name)
                if loading is None:
                    victims = self._make_room(name)
                    loading = self._loading[name] = _Loading()
                    break
            loading.done.wait()
            if loading.error is not None:
                raise loading.error
        try:
            self._close(victims, "to make room for another model")
            engine = self._open(name, spec)
        except BaseException as exc:
            loading.error = exc
            with self._lock:
                del self._loading[name]
            loading.done.set()
            raise
        with self._lock:
            default_keep = None if explicit else self.keep_alive
            self._entries[name] = _Entry(engine, default_keep if keep_alive is KEEP else keep_alive, leases=1)
            del self._loading[name]
            self._default = name   # the most recently loaded model serves requests that name none
            self._specs.setdefault(name, spec)
        loading.done.set()
        log.info("loaded model %s", name, extra={"model": name})
        return engine

    def try_acquire(self, name: str | None, keep_alive=KEEP) -> Engine | None:
        """`acquire` when the model is resident (no waiting); None when it would need a load."""
        with self._lock:
            e = self._entries.get(name if name is not None else (self._default or ""))
            if e is None:
                return None
            e.leases += 1
            if keep_alive is not KEEP:
                e.keep_alive = keep_alive
            self._entries.move_to_end(name if name is not None else self._default)
            return e.engine

    def release(self, name_or_engine, keep_alive=KEEP) -> None:
        with self._lock:
            e = self._find(name_or_engine)
            if e is None:
                return
            e.leases = max(0, e.leases - 1)
            e.idle_since = time.monotonic()
            if keep_alive is not KEEP:
                e.keep_alive = keep_alive
            if e.keep_alive == 0:
                self._wake.set()   # unload it as soon as it is idle

    def unload(self, name: str | None = None) -> list[str]:
        """Unload `name` (None: every model). Requests of it end with MODEL_NOT_LOADED."""
        with self._lock:
            if name is None:
                victims = list(self._entries.items())
                self._entries.clear()
                self._default = None
            else:
                e = self._entries.pop(name, None)
                victims = [(name, e)] if e is not None else []
                if self._default == name:
                    self._default = next(reversed(self._entries), None)
        if not victims:
            raise ModelNotLoaded("no model is loaded" if name is None else f"model {name!r} is not loaded",
                                 details={"model": name} if name else None)
        self._close(victims, "unloaded")
        return [n for n, _ in victims]

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            victims = list(self._entries.items())
            self._entries.clear()
        self._close(victims, "server shutting down")

    # -- internals ---------------------------------------------------------------------------
    def _find(self, name_or_engine) -> _Entry | None:
        if isinstance(name_or_engine, str):
            return self._entries.get(name_or_engine)
        return next((e for e in self._entries.values() if e.engine is name_or_engine), None)

    def _make_room(self, name: str) -> list[tuple[str, _Entry]]:
        """Under the lock: take idle models out, least recently used first, until `name` fits."""
        victims = []
        while len(self._entries) + len(self._loading) >= self.max_loaded:
            idle = next((n for n, e in self._entries.items() if not e.busy()), None)
            if idle is None:
                busy = list(self._entries) + list(self._loading)
                raise ServerBusy(f"cannot load {name!r}: all {self.max_loaded} loaded model slots are busy "
                                 f"(models.max_loaded); retry when a request ends",
                                 details={"model": name, "max_loaded": self.max_loaded, "busy_models": busy})
            victims.append((idle, self._entries.pop(idle)))
        return victims

    def _resolve(self, name: str, spec):
        """What loads `name`: `spec`, or what loaded it before, or the pulled model; else MODEL_NOT_FOUND."""
        from woolly.model_store import KNOWN_MODELS, is_path, model_path

        spec = spec if spec is not None else self._specs.get(name, name)
        # an entry that exists but is no regular file (FIFO, directory, device) fails its load: MODEL_LOAD_FAILED
        if not is_path(spec) and not model_path(name).exists():
            hint = f"; run `woolly pull {name}`" if name in KNOWN_MODELS else ""
            raise ModelNotFound(f"model {name!r} is not available{hint}",
                                details={"model": name, "available_models": self.available()})
        return spec

    def _open(self, name: str, spec) -> Engine:
        spec = spec if spec is not None else self._specs.get(name, name)
        engine = Engine(self.config)
        engine.load_model(spec)
        return engine

    def _close(self, victims: list[tuple[str, _Entry]], why: str) -> None:
        for name, e in victims:
            try:
                e.engine.unload_model()
            except WoollyError:
                pass
            log.info("unloaded model %s (%s)", name, why, extra={"model": name})

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._sweep()
            except Exception:   # a sweep must never kill the pool
                log.exception("model pool sweep failed")

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = []
            for name, e in list(self._entries.items()):
                if e.busy():
                    e.idle_since = now   # idle time counts from when the last request ended
                elif e.keep_alive is not None and now - e.idle_since >= e.keep_alive:
                    expired.append((name, self._entries.pop(name)))
        self._close(expired, "idle past its keep_alive")


def _name_of(spec: str | os.PathLike) -> str:
    """A model's name: a pulled model's name as given, a `.gguf` path's file stem."""
    s = os.fspath(spec)
    return os.path.basename(s)[:-5] if s.endswith(".gguf") else s
