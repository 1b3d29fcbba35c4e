"""The benchmark still runs end to end (a smoke run, a few dozen messages).

Speed is never asserted here: the figures of a run on a shared CI machine
mean nothing. What is asserted is what makes a benchmark run usable: every
message accepted by the relay (and by Postfix, where it runs) was
delivered, nothing failed, the relay logged no warning, and every figure
the report promises is there. Both load generators run: ``smtp-source`` where
Postfix is installed (with Postfix as a target when run as root), the
aiosmtplib generator always.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import postfix, smtpsource
from tests.daemon import REPO

FIGURES = ("msgs_per_s", "p50_ms", "p99_ms", "cpu_s_per_1000", "peak_rss_mb")


@pytest.mark.parametrize(
    ("load", "options", "scenarios"),
    [
        ("smtp-source", [], ["10k-1rcpt-persistent", "10k-1rcpt-per-message"]),
        (
            "aiosmtplib",
            ["--scenario", "10k-1rcpt-per-message", "--target", "ceiling", "--target", "relay"],
            ["10k-1rcpt-per-message"],
        ),
    ],
)
def test_bench_smoke_run_delivers_everything(
    tmp_path: Path, load: str, options: list[str], scenarios: list[str]
) -> None:
    if load == "smtp-source" and smtpsource.command() is None:
        pytest.skip("smtp-source is not installed (Debian: postfix)")
    results = tmp_path / "bench.json"
    # Postfix's daemons run as the postfix user: pytest's tmp_path is private.
    parent = Path(tempfile.mkdtemp(prefix="bench-"))
    parent.chmod(0o755)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench", "--count", "20", "--sessions", "2", "--warmup", "0",
             "--load", load, *options, "--json", str(results), "--tmp-dir", str(parent)],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        left = list(parent.iterdir())
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"load from {load}" in done.stdout
    report = json.loads(results.read_text())
    assert report["format"] == 2
    assert [s["scenario"] for s in report["scenarios"]] == scenarios
    with_postfix = load == "smtp-source" and postfix.commands() is not None
    for scenario in report["scenarios"]:
        assert scenario["load_generator"] == load
        relay, ses = scenario["relay"], scenario["ses"]
        assert relay["accepted_total"] >= 20
        assert relay["delivered"] == relay["accepted_total"] == ses["send_raw_email"]
        assert (relay["errors"], scenario["ceiling"]["errors"]) == ({}, {})
        assert relay["log_warnings_errors"] == 0, relay["log_examples"]
        # One pooled connection per session at most (smtp-source's 2 and its probe).
        assert ses["tls_handshakes"] <= (3 if load == "smtp-source" else 2)
        assert relay["tls_handshakes_per_1000"] is not None
        for target in ("ceiling", "relay"):
            assert all(scenario[target][key] is not None for key in FIGURES), scenario[target]
        assert scenario["ratios"]["relay/ceiling msg/s"] is not None
        if with_postfix:
            pf = scenario["postfix"]
            assert pf["errors"] == {}
            assert pf["delivered"] == pf["accepted_total"] >= 20, pf
            assert isinstance(pf["log_warnings_errors"], int)  # e.g. clock skew on a VM
            assert all(pf[key] is not None for key in FIGURES), pf
            assert scenario["ratios"]["relay/postfix msg/s"] is not None
        if report["fsyncs_counted"]:
            assert relay["fsyncs_per_1000"] is not None
    assert left == []  # no temporary directory left behind


def test_startup_bench_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    parent = tmp_path / "runs"
    parent.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "bench.startup", "--count", "30", "--runs", "1",
         "--tmp-dir", str(parent)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["count"] == 30
    assert [start["queued"] for start in report["starts"]] == [0, 30]
    for start in report["starts"]:
        assert 0 < start["banner_s"] < 120
        assert 0 < start["ready_s"] < 120
        assert start["rss_ready_kib"] > 0
        assert start["rss_idle_kib"] > 0
    for key in ("median_ready_s", "median_banner_s", "empty_ready_s"):
        assert report[key] > 0
    assert isinstance(report["bytes_per_message_idle"], int)
    assert list(parent.iterdir()) == []  # no temporary directory left behind
