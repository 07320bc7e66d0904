"""pytest plugin for GPU sessions: one JSON record per test, rewritten after every test.

    python -m pytest tests -p benchmarks.record_tests --record-json tests.json [--record-timeout 60]

Each record: nodeid, outcome (passed / failed / error / skipped), duration, skip reason, the
failure text, the test's ``record_property`` values and the tail of its captured stdout: the GPU
tests print (and record) the drift they measured, so the figures behind every GPU tolerance come
back with the result (every loosened tolerance cites its measured drift). The file is whole after
every test, so a run killed by
its phase timeout still leaves the tests it finished.

``--record-timeout`` is a per-test limit for machines without pytest-timeout (the GPU image has
it; use its ``--timeout`` there): SIGALRM raises in the test's call phase.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

STDOUT_TAIL = 4000
MESSAGE_TAIL = 3000


def pytest_addoption(parser):
    g = parser.getgroup("record_tests")
    g.addoption("--record-json", default=None, help="write one JSON record per test here")
    g.addoption("--record-timeout", type=float, default=None,
                help="per-test limit of the call phase, seconds (SIGALRM; without pytest-timeout)")


def pytest_configure(config):
    path = config.getoption("--record-json")
    if path:
        config.pluginmanager.register(Recorder(Path(path)), "record_tests_recorder")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--record-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded --record-timeout {limit:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Recorder:
    def __init__(self, path: Path):
        self.path = path
        self.tests: dict[str, dict] = {}
        self.started = time.time()

    def pytest_runtest_logreport(self, report):
        rec = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed",
                                                    "duration_s": 0.0})
        rec["duration_s"] += report.duration
        if report.failed:
            rec["outcome"] = "failed" if report.when == "call" else "error"
            rec["message"] = report.longreprtext[-MESSAGE_TAIL:]
        elif report.skipped and rec["outcome"] == "passed":
            rec["outcome"] = "skipped"
            lr = report.longrepr
            rec["skip_reason"] = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
        if report.user_properties:
            rec["properties"] = {k: v for k, v in report.user_properties}
        if report.capstdout:
            rec["stdout"] = (rec.get("stdout", "") + report.capstdout)[-STDOUT_TAIL:]
        if report.when == "teardown" or (report.when == "setup" and not report.passed):
            self.write()

    def pytest_sessionfinish(self, session, exitstatus):
        self.write(exitstatus=int(exitstatus))

    def write(self, exitstatus=None) -> None:
        counts: dict[str, int] = {}
        for r in self.tests.values():
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        payload = {"finished": exitstatus is not None, "exitstatus": exitstatus, "counts": counts,
                   "elapsed_s": time.time() - self.started, "tests": list(self.tests.values())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, self.path)
