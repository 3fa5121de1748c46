"""The `woolly` command line: parse arguments, show progress, print results.

Every subcommand is a function `cmd_<name>(args) -> int`; a WoollyError prints one line
(`woolly: error: ...`) and exits 1, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from woolly.errors import WoollyError


def _progress_bar(desc: str, unit_scale: float = 100.0):
    """A tqdm bar fed with fractions in [0, 1]; returns (callback, close)."""
    from tqdm import tqdm

    bar = tqdm(total=unit_scale, desc=desc, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
               file=sys.stderr, disable=None)

    def update(fraction: float) -> None:
        bar.n = round(min(max(fraction, 0.0), 1.0) * unit_scale, 2)
        bar.refresh()

    return update, bar.close


def cmd_pull(args) -> int:
    from woolly.model_store import KNOWN_MODELS, model_path, pull

    spec = args.model
    if spec in KNOWN_MODELS and args.name is None and model_path(spec).is_file():
        print(f"{spec} is already pulled: {model_path(spec)}")
        return 0
    bars: dict[str, tuple] = {}

    def progress(stage: str, fraction: float) -> None:
        if stage not in bars:
            for _, close in bars.values():
                close()
            bars[stage] = _progress_bar(f"{stage} {spec}")
        bars[stage][0](fraction)

    try:
        path = pull(spec, progress, name=args.name)
    finally:
        for _, close in bars.values():
            close()
    print(f"pulled {path.stem}: {path}")
    return 0


def cmd_list(args) -> int:
    from woolly.model_store import list_models

    rows = list_models()
    print(f"{'NAME':<28} {'SIZE':>10}  STATUS")
    for r in rows:
        size = f"{r['size'] / 1e6:.1f} MB" if r["size"] else "-"
        print(f"{r['name']:<28} {size:>10}  {'pulled' if r['pulled'] else 'available (woolly pull ' + r['name'] + ')'}")
    return 0


def cmd_info(args) -> int:
    from woolly.chat_template import model_kind, template_origin
    from woolly.model_file import Model

    m = Model.from_file(args.model)
    m.validate()
    md = m.metadata
    print(f"name:          {md.name}\narchitecture:  {md.architecture}\nparameters:    {md.parameters:,}\n"
          f"quantization:  {md.quantization}\nfile size:     {md.file_size:,} bytes\n"
          f"context:       {md.context_length}\nlicense:       {md.license}\nvocabulary:    {m.vocabulary.size}")
    kind, why = model_kind(m)
    origin = {"file": "the file's (tokenizer.chat_template)",
              "builtin": f"built-in {m.architecture} fallback (the file has none)",
              "chatml": "ChatML fallback (the file has none and its family no built-in one)"}[template_origin(m)]
    print(f"kind:          {kind} ({why})\nchat template: {origin}")
    c = m.config
    print(f"layers {c.n_layers}, d {c.d_model}, heads {c.n_heads}/{c.n_kv_heads}, head dim {c.head_dim}, ffn {c.ffn_dim}")
    if c.n_experts:
        print(f"experts {c.n_experts} ({c.n_experts_used} per token), expert ffn {c.expert_ffn_dim}")
    return 0


def cmd_quantize(args) -> int:
    from woolly.formats.quants import QuantizationType
    from woolly.quantize import quantize_model

    try:
        qtype = QuantizationType.parse(args.type)
    except ValueError as e:
        raise WoollyError(str(e), code="INVALID_REQUEST") from None
    update, close = _progress_bar(f"quantize {qtype.name}")
    try:
        quantize_model(args.input, args.output, qtype, progress_callback=update)
    finally:
        close()
    print(f"wrote {args.output}")
    return 0


def _engine(args, batch: int = 1, kv_cache_type: str | None = None):
    from woolly.engine import Engine, EngineConfig

    kv = {"kv_cache_type": kv_cache_type} if kv_cache_type else {}
    engine = Engine(EngineConfig(max_batch_size=batch, max_sequence_length=args.ctx,
                                 residency=getattr(args, "residency", "quantized"), **kv))
    engine.load_model(_pulled(args.model))
    return engine


def _pulled(spec: str) -> str:
    """A known model's name is pulled on first use; paths and other names pass through."""
    from woolly.model_store import KNOWN_MODELS, is_path, model_path, pull

    if not is_path(spec) and spec in KNOWN_MODELS and not model_path(spec).is_file():
        print(f"pulling {spec} ...", file=sys.stderr)
        pull(spec)
    return spec


def _sampling(args) -> dict:
    """The sampling flags' values (None: the library's default), checked together (what each flag's
    own check cannot see: 17 --stop flags) before a model is loaded."""
    from woolly import sampling_settings as settings

    options = {n: getattr(args, n) for n in settings.NAMES}
    settings.validate(options)
    return options


# The CLI's own defaults where they differ from the library's (a terminal wants a longer answer).
CLI_SAMPLING_DEFAULTS = {"max_tokens": 256}
SAMPLING_SHORT_FLAGS = {"max_tokens": "-n", "temperature": "-t"}


def sampling_flags(parser) -> None:
    """One flag per sampling setting (--max-tokens, --repeat-last-n, ...), from its declaration
    (woolly.sampling_settings): type, bounds, default, help. A value out of bounds is argparse's
    usage error, worded as the library's InvalidRequest, before any model loads."""
    from woolly import sampling_settings as settings

    g = parser.add_argument_group("sampling")
    for name in settings.NAMES:
        flags = [f"--{name.replace('_', '-')}"] + ([SAMPLING_SHORT_FLAGS[name]] if name in SAMPLING_SHORT_FLAGS else [])
        if name == "stop":
            g.add_argument(*flags, action="append", type=_setting_type(name), default=None,
                           help=f"a stop string (repeatable: {settings.expectation(name)})")
            continue
        default = CLI_SAMPLING_DEFAULTS.get(name)
        shown = default if default is not None else getattr(settings.DEFAULTS, name)
        g.add_argument(*flags, type=_setting_type(name), default=default,
                       metavar="N" if settings.base_type(name) is int else "X",
                       help=f"{settings.description(name)} ({settings.expectation(name)}"
                            + ("" if shown is None else f"; default {shown}") + ")")


def _setting_type(name: str):
    """argparse's type= for a setting: the text as its base type, checked against its bounds."""
    from woolly import sampling_settings as settings
    from woolly.errors import InvalidRequest

    def parse(text: str):
        try:
            value = settings.base_type(name)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {settings.expectation(name)} (got {text!r})") from None
        try:
            settings.validate({name: value})
        except InvalidRequest as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = name
    return parse


def _distributed_overrides(args) -> dict:
    return {("distributed", "coordinator_address"): getattr(args, "coordinator_address", None),
            ("distributed", "num_processes"): getattr(args, "num_processes", None),
            ("distributed", "process_id"): getattr(args, "process_id", None)}


def _join_cluster(cfg) -> None:
    """Join the jax.distributed cluster the configuration names (if any), before JAX touches a device."""
    from woolly.runtime.distributed import describe, initialize

    if initialize(cfg):
        print(f"woolly: distributed: {describe()}", file=sys.stderr)


def cmd_run(args) -> int:
    from woolly.config import load_config

    cfg = load_config(overrides=_distributed_overrides(args))
    _join_cluster(cfg)
    options = _sampling(args)
    engine = _engine(args, kv_cache_type=cfg.inference.kv_cache_type)   # WOOLLY_KV_CACHE_TYPE, config file
    session = engine.create_session()
    for piece in session.stream_sync(args.prompt, **options):
        print(piece, end="", flush=True)
    print()
    st = session.stats()
    print(f"[{st.generated_tokens} tokens, {st.tokens_per_second:.1f} tok/s, "
          f"first token {st.time_to_first_token or 0:.2f} s, {st.last_finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from woolly.config import load_config

    options = _sampling(args)
    engine = _engine(args, kv_cache_type=load_config().inference.kv_cache_type)   # as `woolly run`
    model = engine.model
    from woolly.chat_template import base_model_warning

    if warning := base_model_warning(model):
        print(f"woolly: warning: {warning}", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("woolly chat: type a message; /clear forgets the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        from woolly.chat_template import tokenize_chat

        ids = tokenize_chat(model, messages, add_generation_prompt=True)
        session = engine.create_session()
        reply = []
        for piece in session.stream_sync(ids, **options):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_tokenize(args) -> int:
    from woolly.model_file import Model

    tok = Model.from_file(_pulled(args.model)).tokenizer
    ids = tok.tokenize(args.text, parse_special=args.parse_special)
    for i in ids:
        print(f"{i:>8}  {tok.token_bytes(i).decode('utf-8', 'replace')!r}")
    print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    from pathlib import Path

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WoollyError(f"cannot read {args.file}: {e.__class__.__name__}", code="INVALID_REQUEST") from None
    args.ctx = max(args.ctx, args.n_ctx)
    engine = _engine(args)
    update, close = _progress_bar("perplexity")
    try:
        ppl = engine.perplexity(text, n_ctx=args.n_ctx, progress=update)
    finally:
        close()
    print(f"perplexity: {ppl:.4f} (n_ctx {args.n_ctx}, second half of each chunk scored)")
    return 0


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    from woolly.config import load_config, parse_keep_alive
    from woolly.engine import CacheConfig, EngineConfig
    from woolly.engine.pool import ModelPool
    from woolly.http.app import create_app
    from woolly.http.connections import connection_cap, protocol_class
    from woolly.http.logs import setup_logging

    cfg = load_config(args.config, overrides={("server", "host"): args.host, ("server", "port"): args.port,
                                              ("inference", "residency"): args.residency,
                                              ("inference", "tensor_parallel"): args.tensor_parallel,
                                              ("inference", "data_parallel"): args.data_parallel,
                                              **_distributed_overrides(args)})
    _join_cluster(cfg)
    if cfg.models.directory:
        import os
        os.environ["WOOLLY_MODELS_DIR"] = cfg.models.directory
    setup_logging(cfg.logging)
    _check_port_free(cfg.server.host, cfg.server.port)   # before the model load, not after it
    inf = cfg.inference
    pool = ModelPool(EngineConfig(max_batch_size=inf.max_batch_size, max_sequence_length=inf.max_sequence_length,
                                  enable_gpu=inf.gpu.enabled, num_threads=inf.cpu.threads, residency=inf.residency,
                                  kv_cache_type=inf.kv_cache_type,
                                  tensor_parallel=inf.tensor_parallel, data_parallel=inf.data_parallel,
                                  max_queue=cfg.server.max_queue,
                                  max_embedding_tokens=cfg.server.max_embedding_tokens,
                                  embedding_chunk_tokens=cfg.server.embedding_chunk_tokens,
                                  cache_config=CacheConfig(cfg.cache.enabled, cfg.cache.size, cfg.cache.ttl)),
                     max_loaded=cfg.models.max_loaded, keep_alive=parse_keep_alive(cfg.models.keep_alive))
    try:
        # the models it starts with stay loaded (until unloaded or evicted); the first serves requests naming none
        models = [args.model] if args.model else (cfg.models.preload[:cfg.models.max_loaded] or [cfg.models.default])
        for model in reversed(models):
            pool.load(_pulled(model))
        app = create_app(cfg, pool)
        srv = cfg.server
        protocol = protocol_class(srv.header_timeout, srv.body_timeout, connection_cap(srv.max_connections))
        logging.getLogger("woolly").info("serving %s on http://%s:%d", models[0], srv.host, srv.port)
        uvicorn.run(app, host=srv.host, port=srv.port, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                    http=protocol, timeout_keep_alive=srv.keep_alive_timeout,
                    ws_max_size=srv.max_body_bytes)
    finally:
        pool.close()
    return 0


def _check_port_free(host: str, port: int) -> None:
    """WoollyError when host:port cannot be listened on (in use, or not this machine's address).
    Bound and released with the options uvicorn uses (SO_REUSEADDR), so a free port passes."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise WoollyError(f"cannot listen on {host}:{port}: {e.strerror or e} (server.port, --port)",
                          code="INVALID_REQUEST") from None


def cmd_bench(args) -> int:
    from woolly.bench import main as bench_main

    _pulled(args.model)
    return bench_main(args)


RESIDENCY_HELP = "quantized weights (the default, fast) or dense f32 weights (the exact mode)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="woolly", description="Run GGUF language models on JAX.")
    from woolly import __version__
    p.add_argument("--version", action="version", version=f"woolly {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("pull", help="bring a model into the models directory: a known name, a .gguf path, "
                                    "or hf.co/owner/repo[:QUANT]")
    s.add_argument("model", help="smollm2-135m-instruct, ./file.gguf, or hf.co/owner/repo:Q4_K_M (HF_ENDPOINT honoured)")
    s.add_argument("--name", default=None, help="register a file or Hugging Face download under this name")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("list", help="list pulled and available models")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("info", help="show a model's metadata and check its tensors")
    s.add_argument("model", help="a pulled model's name or a .gguf path")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("quantize", help="re-quantize a GGUF file")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--type", "-t", required=True, help="F32, F16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q2_K, ...")
    s.set_defaults(func=cmd_quantize)

    def generation_flags(s, ctx=2048):
        sampling_flags(s)
        s.add_argument("--ctx", type=int, default=ctx, help="context length")
        s.add_argument("--residency", choices=("dense", "quantized"), default="quantized", help=RESIDENCY_HELP)

    def distributed_flags(s):
        g = s.add_argument_group("multi-process (jax.distributed; also WOOLLY_COORDINATOR_ADDRESS, ...)")
        g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT", help="process 0's address")
        g.add_argument("--num-processes", type=int, default=None)
        g.add_argument("--process-id", type=int, default=None)

    s = sub.add_parser("run", help="complete a prompt, streaming to the terminal")
    s.add_argument("model")
    s.add_argument("prompt")
    generation_flags(s)
    distributed_flags(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("chat", help="an interactive chat with the model's template")
    s.add_argument("model")
    s.add_argument("--system", default=None, help="a system message")
    generation_flags(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("tokenize", help="show a text's token ids and pieces")
    s.add_argument("model")
    s.add_argument("text")
    s.add_argument("--parse-special", action="store_true")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity's method)")
    s.add_argument("model")
    s.add_argument("file")
    s.add_argument("--n-ctx", type=int, default=512)
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument("--residency", choices=("dense", "quantized"), default="quantized", help=RESIDENCY_HELP)
    s.set_defaults(func=cmd_perplexity)

    s = sub.add_parser("serve", help="serve the HTTP API (default 127.0.0.1:11434)")
    s.add_argument("model", nargs="?", default=None, help="model to load (default: config, then smollm2-135m-instruct)")
    s.add_argument("--config", default=None, help="a woolly.config.yaml")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--residency", choices=("dense", "quantized"), default=None,
                   help=RESIDENCY_HELP + "; config inference.residency")
    s.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="split heads and MLP over N of this process's devices (docs/sharding.md)")
    s.add_argument("--data-parallel", type=int, default=None, metavar="N", help="split the slots over N devices")
    distributed_flags(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("bench", help="measure load, first token, prefill, decode and memory (vs llama.cpp)")
    s.add_argument("model", help="a pulled model's name or a .gguf path")
    s.add_argument("--compare", choices=("llama-cpp",), default=None,
                   help="also run llama.cpp (llama-cpp-python, the `peer` extra) in the same run")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="draw the figures (needs matplotlib)")
    s.add_argument("--output", "-o", default=None, metavar="FILE.json", help="also write the JSON report here")
    s.add_argument("--residency", choices=("dense", "quantized"), default="quantized", help=RESIDENCY_HELP)
    s.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default 2)")
    s.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 3; medians)")
    s.add_argument("--quick", action="store_true", help="every figure at reduced sizes (tests), not for numbers")
    s.add_argument("--kernels", choices=("native", "xla"), default="native",
                   help="woolly's C++ CPU kernels (default) or the XLA-only fallback")
    s.add_argument("--peer-lib", default=None, metavar="DIR",
                   help="load llama.cpp from DIR/libllama.so (e.g. an AVX2-only build) instead of the wheel's")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except WoollyError as e:
        print(f"woolly: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a directory or file the user pointed at cannot be used: one line too
        where = f": {os.path.basename(e.filename)}" if e.filename else ""
        print(f"woolly: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("woolly: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
