"""pytest plugin: outcomes per reliability.md line -> the summary table in tests/reliability/README.md.

Loaded by `make reliability` (`-p rel_report --reliability-report=PATH`, with tests/reliability
on PYTHONPATH). Each test's outcome is matched to the lines of `catalog.LINES` whose patterns
name it; the figures the load and fault tests leave in their modules' `results` dicts are
added under the tables.
"""
from __future__ import annotations

import datetime
import fnmatch
import os
import platform
import time

import pytest

from catalog import LINES, SECTIONS

outcomes: dict[str, str] = {}   # node id -> passed / failed / skipped
figures: dict[str, str] = {}
started = time.monotonic()


def pytest_addoption(parser):
    parser.addoption("--reliability-report", default=None, help="write the reliability summary to this file")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        previous = outcomes.get(report.nodeid)
        if previous != "failed":   # a failed setup or teardown counts as failed
            outcomes[report.nodeid] = "failed" if report.outcome == "failed" else report.outcome


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--reliability-report")
    if not path:
        return
    for item in session.items:
        for key, value in getattr(item.module, "results", {}).items():
            figures[key] = value
    with open(path, "w") as f:
        f.write(render(session.config))


def _matching(patterns: list[str]) -> list[str]:
    return sorted(n for n in outcomes if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def render(config) -> str:
    rows, per_section = [], {s: {"lines": 0, "ok": 0, "tried": set(), "passed": set()} for s in SECTIONS}
    held = {"load": [0, 0], "fault": [0, 0]}
    for section, line, kind, patterns in LINES:
        nodes = _matching(patterns)
        ran = [n for n in nodes if outcomes[n] != "skipped"]
        passed = [n for n in ran if outcomes[n] == "passed"]
        ok = bool(ran) and len(passed) == len(ran)
        status = "pass" if ok else ("not run" if not ran else f"FAIL ({len(ran) - len(passed)})")
        files = sorted({n.split("::")[0].removeprefix("tests/") for n in ran})
        rows.append((section, line, kind, len(ran), len(passed), status, ", ".join(files)))
        s = per_section[section]
        s["lines"] += 1
        s["ok"] += ok
        s["tried"].update(ran)
        s["passed"].update(passed)
        if kind in held:
            held[kind][0] += ok
            held[kind][1] += 1
    total_tried = len({n for s in per_section.values() for n in s["tried"]})
    total_passed = len({n for s in per_section.values() for n in s["passed"]})
    out = [
        "# Reliability summary",
        "",
        "Every line of `shared/reference/reliability.md` (and issue 8's additions), the tests that",
        "build it, and how they did. Written by `make reliability` (tests/reliability/rel_report.py);",
        "do not edit by hand.",
        "",
        f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.monotonic() - started:.0f} s, {platform.node() or 'this machine'} ({os.cpu_count()} CPUs), "
        f"fuzz examples per operation and mode: {os.environ.get('WOOLLY_FUZZ_EXAMPLES', '3')}, "
        f"memory requests: {os.environ.get('WOOLLY_MEMORY_REQUESTS', '2000')}.",
        "",
        "| Section | Lines passing | Cases tried | Passed |",
        "|---|---|---|---|",
    ]
    for name in SECTIONS:
        s = per_section[name]
        out.append(f"| {name} | {s['ok']}/{s['lines']} | {len(s['tried'])} | {len(s['passed'])} |")
    out += [
        f"| **All** | {sum(s['ok'] for s in per_section.values())}/{len(LINES)} | {total_tried} | {total_passed} |",
        "",
        f"- **Load held**: {held['load'][0]}/{held['load'][1]} load lines pass.",
        f"- **Faults survived**: {held['fault'][0]}/{held['fault'][1]} fault lines pass.",
    ]
    for key in ("rounds", "busy", "health", "memory", "cancel"):
        if key in figures:
            out.append(f"- {key}: {figures[key]}")
    out += ["", "## Per line", ""]
    for section in SECTIONS:
        out += [f"### {section}", "", "| Line | Kind | Tried | Passed | Status | Test files |", "|---|---|---|---|---|---|"]
        for sec, line, kind, tried, passed, status, files in rows:
            if sec == section:
                out.append(f"| {line} | {kind} | {tried} | {passed} | {status} | {files} |")
        out.append("")
    out += [
        "## Reproduce",
        "",
        "    make reliability          # everything below, this file rewritten",
        "    .venv/bin/python -m pytest tests/reliability -m 'not slow'   # the quick subset make test runs",
        "",
        "`make reliability` runs tests/reliability (slow tests included: 100 early cancels, RssAnon over",
        "2,000 requests) and the existing tests the catalogue names (tests/reliability/catalog.py).",
        "",
    ]
    return "\n".join(out)
