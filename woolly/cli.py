"""The `woolly` command line: parse arguments, show progress, print results.

Every subcommand is a function `cmd_<name>(args) -> int`; a WoollyError prints one line
(`woolly: error: ...`) and exits 1, never a traceback.
"""
from __future__ import annotations

import argparse
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
    from woolly.registry import model_path, pull

    dest = model_path(args.name)
    if dest.is_file():
        print(f"{args.name} is already pulled: {dest}")
        return 0
    bars: dict[str, tuple] = {}

    def progress(stage: str, fraction: float) -> None:
        if stage not in bars:
            for _, close in bars.values():
                close()
            bars[stage] = _progress_bar(f"{stage} {args.name}")
        bars[stage][0](fraction)

    try:
        path = pull(args.name, progress)
    finally:
        for _, close in bars.values():
            close()
    print(f"pulled {args.name}: {path}")
    return 0


def cmd_list(args) -> int:
    from woolly.registry import list_models

    rows = list_models()
    print(f"{'NAME':<28} {'SIZE':>10}  STATUS")
    for r in rows:
        size = f"{r['size'] / 1e6:.1f} MB" if r["size"] else "-"
        print(f"{r['name']:<28} {size:>10}  {'pulled' if r['pulled'] else 'available (woolly pull ' + r['name'] + ')'}")
    return 0


def cmd_info(args) -> int:
    from woolly.model import Model

    m = Model.from_file(args.model)
    m.validate()
    md = m.metadata
    print(f"name:          {md.name}\narchitecture:  {md.architecture}\nparameters:    {md.parameters:,}\n"
          f"quantization:  {md.quantization}\nfile size:     {md.file_size:,} bytes\n"
          f"context:       {md.context_length}\nlicense:       {md.license}\nvocabulary:    {m.vocabulary.size}")
    c = m.config
    print(f"layers {c.n_layers}, d {c.d_model}, heads {c.n_heads}/{c.n_kv_heads}, head dim {c.head_dim}, ffn {c.ffn_dim}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="woolly", description="Run GGUF language models on JAX.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("pull", help="fetch a known model into the models directory")
    s.add_argument("name")
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except WoollyError as e:
        print(f"woolly: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("woolly: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
