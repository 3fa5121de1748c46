"""`Engine`: loads one model at a time and serves sessions through one continuous-batching scheduler."""
from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from woolly.engine.config import EngineConfig
from woolly.engine.samplers import GenerationParams
from woolly.engine.scheduler import GenerationResult, Scheduler
from woolly.engine.session import Session
from woolly.errors import InvalidRequest, ModelLoadFailed, ModelNotLoaded, WoollyError


@dataclass
class EngineStats:
    model: str | None
    load_time: float | None          # seconds, last load
    active_sessions: int             # sequences decoding now
    queued_requests: int
    tokens_generated: int
    host_memory: int                 # bytes, process resident anonymous memory
    device_memory: int               # bytes held by live JAX arrays
    compiles: int                    # XLA compilations in this process


@dataclass(frozen=True)
class SchedulerLoad:
    """The scheduler's counters, cheap to read (for /metrics); zeros while no model is loaded."""
    active: int = 0             # slots decoding now
    waiting: int = 0            # requests queued for a slot
    tokens_generated: int = 0   # tokens this model's scheduler has produced


class _CompileCounter:
    """Counts XLA backend compiles through jax.monitoring (cache hits don't count)."""

    count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        import jax

        def listener(event: str, duration: float, **_):
            if event == "/jax/core/compile/backend_compile_duration":
                cls.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._installed = True


def rss_anon_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Engine:
    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig.default()
        self._lock = threading.RLock()
        self._model = None
        self._runner = None
        self._scheduler: Scheduler | None = None
        self._model_name: str | None = None
        self._load_time: float | None = None
        self._session_ids = itertools.count(1)
        self._tokens_generated = 0
        _CompileCounter.install()

    # -- models ------------------------------------------------------------------------------
    def load_model(self, path_or_name: str | os.PathLike) -> None:
        """Load a `.gguf` path or a pulled model's name; on failure the previous model stays."""
        from woolly.model_file import Model
        from woolly.model_store import resolve_model_path
        from woolly.runtime import Runner
        from woolly.runtime.runner import early_load

        t0 = time.perf_counter()
        cfg = self.config
        early = None   # the first request's executables, loading before the file is read (one device only)
        if cfg.single_device:
            try:
                early = early_load(resolve_model_path(path_or_name), cfg.max_batch_size,
                                   cfg.max_sequence_length, cfg.residency, cfg.kv_cache_type)
            except Exception:   # a bad name or path: Model.from_file says what is wrong
                early = None
        model = Model.from_file(path_or_name)
        try:
            model.validate()
            length = min(cfg.max_sequence_length, model.config.context_length or cfg.max_sequence_length)
            mesh = cfg.make_mesh()
            slots = cfg.max_batch_size
            if mesh is not None:   # whole slots per data-parallel device
                dp = int(mesh.shape["data"])
                slots = -(-slots // dp) * dp
            # the runner first: it starts loading the first steps' executables while the tokenizer is built
            runner = Runner(model, residency=cfg.residency, slots=slots, cache_length=length, mesh=mesh,
                            kv_cache_type=cfg.kv_cache_type, load_first_steps=early or True)
            tokenizer = model.tokenizer
        except WoollyError:
            model.close()
            raise
        except MemoryError:
            model.close()
            from woolly.errors import OutOfMemory
            raise OutOfMemory("not enough memory to load the model") from None
        except Exception as e:
            model.close()
            raise ModelLoadFailed(f"could not load the model: {type(e).__name__}: {e}") from None
        cc = self.config.cache_config
        scheduler = Scheduler(runner, tokenizer, max_queue=self.config.max_queue, cache_bytes=cc.size,
                              cache_ttl=cc.ttl, cache_enabled=cc.enabled)
        with self._lock:
            old, old_model = self._scheduler, self._model
            self._model, self._runner, self._scheduler = model, runner, scheduler
            self._model_name = os.fspath(path_or_name) if not str(path_or_name).endswith(".gguf") \
                else os.path.basename(os.fspath(path_or_name))[:-5]
            self._load_time = time.perf_counter() - t0
        if old is not None:
            old.close(ModelNotLoaded("the model was replaced while this request ran"))
            old_model.close()
        # llguidance's view of the vocabulary, built in the background once the engine is idle,
        # not by the scheduler on the first grammar request (a 0.2-1.2 s stall of every slot)
        from woolly.engine.grammar import prepare_vocabulary
        prepare_vocabulary(tokenizer, idle=scheduler.idle)

    def unload_model(self) -> None:
        with self._lock:
            sched, self._scheduler = self._scheduler, None
            model, self._model, self._runner, self._model_name = self._model, None, None, None
        if sched is None:
            raise ModelNotLoaded("no model is loaded")
        sched.close(ModelNotLoaded("the model was unloaded while this request ran"))
        model.close()

    def close(self) -> None:
        """Stop the scheduler (queued and running requests end with MODEL_NOT_LOADED) and free the
        model. Idempotent; the engine can load a model again afterwards."""
        with self._lock:
            sched, self._scheduler = self._scheduler, None
            model, self._model, self._runner, self._model_name = self._model, None, None, None
        if sched is not None:
            sched.close(ModelNotLoaded("the engine was closed while this request ran"))
        if model is not None:
            model.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def current_model_name(self) -> str | None:
        return self._model_name

    @property
    def model(self):
        if self._model is None:
            raise ModelNotLoaded("no model is loaded")
        return self._model

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def scheduler(self) -> Scheduler:
        s = self._scheduler
        if s is None:
            raise ModelNotLoaded("no model is loaded")
        return s

    def load(self) -> SchedulerLoad:
        s = self._scheduler
        return SchedulerLoad(s.active, s.waiting, s.tokens_generated) if s is not None else SchedulerLoad()

    # -- sessions ----------------------------------------------------------------------------
    def create_session(self) -> Session:
        self.model  # raises ModelNotLoaded
        return Session(self, next(self._session_ids))

    def stats(self) -> EngineStats:
        import jax

        sched = self._scheduler
        device = sum(a.nbytes for a in jax.live_arrays())
        return EngineStats(
            model=self._model_name, load_time=self._load_time,
            active_sessions=sched.active if sched else 0, queued_requests=sched.waiting if sched else 0,
            tokens_generated=self._tokens_generated, host_memory=rss_anon_bytes(), device_memory=device,
            compiles=_CompileCounter.count)

    def _count_generated(self, n: int) -> None:
        self._tokens_generated += n

    # -- text <-> ids --------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest("text must be a string")
        return list(self.tokenizer.tokenize(text, add_bos=add_bos, parse_special=parse_special))

    def detokenize(self, ids: list[int]) -> str:
        self.check_token_ids(ids)
        return self.tokenizer.decode(list(ids))

    def check_token_ids(self, ids) -> None:
        n = self.tokenizer.vocab_size
        for t in ids:
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < n:
                raise InvalidRequest(f"token id {t!r} is outside the vocabulary (0..{n - 1})")

    # -- helpers for evaluation scripts ---------------------------------------------------------
    def generate_batch(self, prompts: list[str], **options) -> list[GenerationResult]:
        """Complete every prompt, all sharing the batched decode; results in prompt order."""
        import queue

        params = GenerationParams.from_kwargs(**options)
        q: queue.Queue = queue.Queue()
        sched = self.scheduler()
        reqs = []
        results: list[GenerationResult | None] = [None] * len(prompts)
        pending = len(prompts)
        try:
            for i, p in enumerate(prompts):
                reqs.append(sched.submit(self.tokenize(p), params, lambda e, i=i: q.put((i, e))))
            while pending:
                i, event = q.get()
                if isinstance(event, WoollyError):
                    raise event
                if isinstance(event, GenerationResult):
                    results[i] = event
                    pending -= 1
        finally:
            if pending:   # a refused prompt, an error or an interrupt: the others stop at the next step
                for r in reqs:
                    r.cancel()
        self._count_generated(sum(r.generated_tokens for r in results))
        return results

    def perplexity(self, text: str, n_ctx: int = 512, progress=None) -> float:
        """llama-perplexity's measure: chunks of n_ctx tokens, the second half of each scored."""
        runner = self._runner
        if runner is None:
            raise ModelNotLoaded("no model is loaded")
        if n_ctx < 16 or n_ctx > runner.cache_length:
            raise InvalidRequest(f"n_ctx must be between 16 and {runner.cache_length}")
        voc = self.model.vocabulary
        ids = self.tokenize(text, add_bos=False)
        n_chunks = len(ids) // n_ctx
        if n_chunks == 0:
            raise InvalidRequest(f"the text has {len(ids)} tokens; perplexity needs at least n_ctx={n_ctx}")
        first = n_ctx // 2
        chunks = np.array(ids[:n_chunks * n_ctx], np.int32).reshape(n_chunks, n_ctx)        # [C, n_ctx]
        if voc.add_bos and voc.bos_id is not None:
            chunks[:, 0] = voc.bos_id
        per_call = runner.data_parallel   # chunks scored at once: one per data-parallel device
        nll, count = 0.0, 0
        for c in range(0, n_chunks, per_call):
            batch = chunks[c:c + per_call]
            n = len(batch)
            if n < per_call:   # the last group: pad with copies, scored but not counted
                batch = np.concatenate([batch, np.repeat(batch[-1:], per_call - n, axis=0)])
            for logp in runner.token_logprobs(batch)[:n]:                                   # [n_ctx-1] each
                scored = logp[first - 1:]
                nll -= float(scored.sum())
                count += len(scored)
            if progress:
                progress((c + n) / n_chunks)
        return float(np.exp(nll / count))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled, L2-normalized final hidden states -> f32 [len(texts), D]."""
        return self.embed_counted(texts)[0]

    def embed_counted(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """`embed`, and the tokens the inputs held (at most `max_embedding_tokens`, else InvalidRequest)."""
        runner = self._runner
        if runner is None:
            raise ModelNotLoaded("no model is loaded")
        cap = self.config.max_embedding_tokens
        lists, total = [], 0
        for t in texts:
            ids = self.tokenize(t) or [self.model.vocabulary.bos_id or 0]
            if len(ids) > runner.cache_length:
                raise InvalidRequest(f"an input has {len(ids)} tokens; at most {runner.cache_length}")
            total += len(ids)
            if total > cap:   # stop tokenizing: the request is refused whatever the rest holds
                raise InvalidRequest(f"the inputs hold more than {cap} tokens, the limit for one embeddings "
                                     f"request (max_embedding_tokens)", details={"max_embedding_tokens": cap})
            lists.append(ids)
        if not lists:
            raise InvalidRequest("input must hold at least one text")
        return runner.embed(lists, chunk_tokens=self.config.embedding_chunk_tokens), total
