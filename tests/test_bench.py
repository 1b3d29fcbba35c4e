"""The benchmark still runs end to end (a smoke run, a few dozen messages).

Speed is never asserted here: the figures of a run on a shared CI machine
mean nothing. What is asserted is what makes a benchmark run usable: every
message accepted by the relay reached the fake SES, nothing failed, and
the relay logged no warning.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.daemon import REPO


def test_bench_smoke_run_delivers_everything(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--count", "20", "--sessions", "2", "--warmup", "0",
         "--json", str(results), "--tmp-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(results.read_text())
    names = [s["scenario"] for s in report["scenarios"]]
    assert names == ["10k-1rcpt-persistent", "10k-1rcpt-per-message"]
    for scenario in report["scenarios"]:
        relay, ses = scenario["relay"], scenario["ses"]
        assert relay["accepted_total"] >= 20
        assert relay["delivered"] == relay["accepted_total"] == ses["send_raw_email"]
        assert (relay["errors"], scenario["ceiling"]["errors"]) == ({}, {})
        assert relay["log_warnings_errors"] == 0, relay["log_examples"]
        assert ses["tls_handshakes"] <= 2  # one pooled connection per session at most
    assert list(tmp_path.iterdir()) == [results]  # no temporary directory left behind
