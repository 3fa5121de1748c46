"""Reporting: the text table, the README's markdown table and the plots."""
from __future__ import annotations


# -- reporting -------------------------------------------------------------------------------------------
def _f(x, spec=".1f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(figure, Woolly, llama.cpp, ratio) rows for the text table."""
    w, l, r = report["woolly"], report.get("llama_cpp"), report.get("ratios") or {}
    lv = (lambda *keys: _get(l, keys)) if l else (lambda *keys: None)
    mb = 1e6
    out = [
        ("load (s)", _f(w["load_s"], ".2f"), _f(lv("load_s"), ".2f"), _f(r.get("load_s"), ".2f", "x")),
        ("first token, new process, cold cache (s)", _f(w["ttft_cold_s"], ".2f"), _f(lv("ttft_cold_s"), ".2f"),
         _f(r.get("ttft_cold_s"), ".2f", "x")),
        ("first token, new process, warm cache (s)", _f(w["ttft_warm_s"], ".2f"), _f(lv("ttft_warm_s"), ".2f"),
         _f(r.get("ttft_warm_s"), ".2f", "x")),
    ]
    for n in w["prefill_tps"]:
        out.append((f"prefill {n} tokens (tok/s)", _f(w["prefill_tps"][n]), _f(lv("prefill_tps", n)),
                    _f(_get(r, ("prefill_tps", n)), ".2f", "x")))
    out.append(("decode batch 1 (tok/s; llama.cpp: llama-cpp-python generate loop)", _f(w["decode_tps"]), _f(lv("decode_tps")),
                _f(r.get("decode_tps"), ".2f", "x")))
    out.append(("  as fraction of bandwidth bound", _f(w["decode_bound_fraction"], ".2f"),
                _f(lv("decode_bound_fraction"), ".2f"), ""))
    if l and l.get("decode_tps_one_thread"):
        out.append(("  llama.cpp on 1 thread (contention check)", "", _f(l["decode_tps_one_thread"]), ""))
    for n in w["aggregate_tps"]:
        out.append((f"aggregate decode, {n} sessions (tok/s; llama.cpp: sequential Python loop)", _f(w["aggregate_tps"][n]),
                    _f(lv("aggregate_tps", n)), _f(_get(r, ("aggregate_tps", n)), ".2f", "x")))
    big = str(max(int(n) for n in w["aggregate_tps"]))
    out.append((f"aggregate {big} sessions / peer batch-1 decode", "", "",
                _f(_get(r, ("aggregate_tps_vs_peer_decode", big)), ".2f", "x")))
    nat, rn = report.get("llama_cpp_native"), report.get("ratios_native") or {}
    if nat:   # llama.cpp's own batching: the llama.cpp column is LlamaNative's figure
        for n in w["prefill_tps"]:
            out.append((f"prefill {n} tokens vs llama.cpp native llama_decode (tok/s)", _f(w["prefill_tps"][n]),
                        _f(nat["prefill_tps"].get(n)), _f(_get(rn, ("prefill_tps", n)), ".2f", "x")))
        out.append(("decode batch 1 vs llama.cpp native llama_decode (tok/s)", _f(w["decode_tps"]),
                    _f(nat["decode_tps"]), _f(rn.get("decode_tps"), ".2f", "x")))
        for n in w["aggregate_tps"]:
            out.append((f"aggregate {n} sessions vs llama.cpp {n} sequences in one llama_batch (tok/s)",
                        _f(w["aggregate_tps"][n]), _f(nat["aggregate_tps"].get(n)),
                        _f(_get(rn, ("aggregate_tps", n)), ".2f", "x")))
    g = w.get("grammar") or {}
    gt, gc, gh = g.get("decode_tps", {}), g.get("cost", {}), g.get("host_ms_per_token", {})
    out.append(("constrained decode batch 1: unconstrained, same prompt (tok/s)", _f(gt.get("none")), "", ""))
    for kind, label in (("json_schema", "JSON schema"), ("regex", "regex")):
        h = gh.get(kind) or {}
        out.append((f"  {label} (tok/s, cost vs unconstrained; host mask ms/token)",
                    f"{_f(gt.get(kind))} ({_f(_pct(gc.get(kind)), '.1f', '%')}; {_f(h.get('fill_ms'), '.2f')})"
                    if kind in gt else "-", "", ""))
    wm, lm = w["memory"], (l or {}).get("memory", {})
    out.append(("memory: RSS after load - before (MB)", _f(wm["rss_bytes"] / mb), _f(_div(lm.get("rss_bytes"), mb)),
                _f(r.get("memory_rss"), ".2f", "x")))
    out.append(("model memory: RSS delta - KV cache (MB)", _f(wm["model_bytes"] / mb), "", ""))
    out.append(("  as a multiple of the file size", _f(wm["model_bytes"] / report["file_bytes"], ".2f", "x"), "", ""))
    out.append(("memory: RssAnon after - before (MB)", _f(wm["rss_anon_bytes"] / mb),
                _f(_div(lm.get("rss_anon_bytes"), mb)), _f(r.get("memory_rss_anon"), ".2f", "x")))
    out.append(("memory: JAX live arrays, weights + KV (MB)",
                f"{wm['device_bytes'] / mb:.1f} ({wm['device_weight_bytes'] / mb:.1f} + "
                f"{wm['device_kv_cache_bytes'] / mb:.1f})", "", ""))
    return out


def _get(d, keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d


def _pct(x):
    return None if x is None else 100 * x


def _div(a, b):
    return None if a is None else a / b


def format_text(report: dict) -> str:
    m = report["machine"]
    head = (f"{report['model']} ({report['file_bytes'] / 1e6:.1f} MB), residency {report['residency']}, "
            f"{report['threads']} threads{', QUICK (reduced sizes)' if report['quick'] else ''}\n"
            f"memory read bandwidth {m['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, weights read per token "
            f"{report['weight_bytes_per_token'] / 1e6:.1f} MB -> decode bound {report['decode_bound_tps']:.0f} tok/s; "
            f"load average {m['load_average_before']} -> {m['load_average_after']}\n")
    table = rows(report)
    cols = ["figure", "woolly", "llama.cpp", "woolly/llama.cpp"] if report.get("llama_cpp") else ["figure", "woolly"]
    table = [r[:len(cols)] for r in table]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cols))]
    for r in table:
        lines.append("  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(r)))
    if m.get("peer_contention_bound"):
        lines.append(f"WARNING: llama.cpp decodes faster on 1 thread ({report['llama_cpp']['decode_tps_one_thread']:.1f} "
                     f"tok/s) than on {report['threads']}: the machine is oversubscribed and the ratios flatter Woolly")
    tl = ["targets:"]
    for k, v in report["targets"].items():
        met = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
        tl.append(f"  {k}: {_f(v['value'], '.2f')} (target {v['target']}) {met}")
    return head + "\n".join(lines) + "\n" + "\n".join(tl) + "\n"


def plot(reports: list[dict], path: str) -> None:
    """One row of panels per report: throughput vs llama.cpp, aggregate vs sessions, times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 3, figsize=(15, 3.8 * len(reports)), squeeze=False)
    for row, rep in zip(axes, reports):
        w, l = rep["woolly"], rep.get("llama_cpp")
        title = f"{rep['model']} · {rep['residency']}"
        labels = [f"prefill {n}" for n in w["prefill_tps"]] + ["decode b1"]
        wv = [w["prefill_tps"][n] or 0 for n in w["prefill_tps"]] + [w["decode_tps"] or 0]
        x = range(len(labels))
        ax = row[0]
        ax.bar([i - 0.2 for i in x], wv, 0.4, label="woolly")
        if l:
            lv_ = [l["prefill_tps"].get(n) or 0 for n in w["prefill_tps"]] + [l["decode_tps"] or 0]
            ax.bar([i + 0.2 for i in x], lv_, 0.4, label="llama.cpp")
            nat = rep.get("llama_cpp_native")
            if nat:
                nv = [nat["prefill_tps"].get(n) or 0 for n in w["prefill_tps"]] + [nat["decode_tps"] or 0]
                ax.plot([i + 0.2 for i in x], nv, "kD", ms=7, ls="none",
                        label="llama.cpp native llama_decode (no Python loop)")
            if l.get("decode_tps_one_thread"):
                ax.plot([len(labels) - 1 + 0.2], [l["decode_tps_one_thread"]], "k*", ms=12,
                        label="llama.cpp decode, 1 thread (contention check)")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax = row[1]
        ns = [int(n) for n in w["aggregate_tps"]]
        ax.plot(ns, [w["aggregate_tps"][str(n)] for n in ns], "o-", label="woolly (continuous batching)")
        if l:
            ax.plot(ns, [l["aggregate_tps"].get(str(n)) for n in ns], "s-", label="llama.cpp (sequential)")
            nat = rep.get("llama_cpp_native")
            if nat:
                ax.plot(ns, [nat["aggregate_tps"].get(str(n)) for n in ns], "^-",
                        label="llama.cpp (N sequences in one llama_batch)")
            ax.axhline(4 * l["decode_tps"], ls=":", c="gray", label="target: 4x llama.cpp batch-1")
            if l.get("decode_tps_one_thread"):
                ax.axhline(4 * l["decode_tps_one_thread"], ls="-.", c="black",
                           label="4x llama.cpp batch-1 on 1 thread")
        ax.axhline(rep["decode_bound_tps"], ls="--", c="red", label="batch-1 bandwidth bound")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title("aggregate decode")
        ax.legend(fontsize=7)
        ax = row[2]
        tl = ["load", "1st token\ncold cache", "1st token\nwarm cache"]
        keys = ["load_s", "ttft_cold_s", "ttft_warm_s"]
        ax.bar([i - 0.2 for i in range(3)], [w[k] or 0 for k in keys], 0.4, label="woolly")
        if l:
            ax.bar([i + 0.2 for i in range(3)], [l[k] or 0 for k in keys], 0.4, label="llama.cpp")
        ax.set_xticks(range(3), tl)
        ax.set_ylabel("seconds (new process for 1st token)")
        ax.set_yscale("log")
        ax.set_title("startup")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(reports: list[dict]) -> str:
    """The benchmarks/README table: one column group per (model, residency)."""
    head = "| figure | " + " | ".join(f"{r['model']} {r['residency']}: woolly / llama.cpp / ratio"
                                      for r in reports) + " |"
    sep = "|---|" + "---|" * len(reports)
    table = [rows(r) for r in reports]
    lines = [head, sep]
    for i, first in enumerate(table[0]):
        cells = []
        for t in table:
            _, wv, lv_, rv = t[i]
            cells.append(" / ".join(x for x in (wv, lv_, rv) if x) or "")
        lines.append(f"| {first[0].strip()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
