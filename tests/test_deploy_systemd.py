"""deploy/ses-relay.service, alone and with the low-ports drop-in, as
``systemd-analyze`` judges it offline (no running systemd needed): ``verify``
says nothing, ``security`` scores at most 2.0, and the drop-in changes only
what binding a port below 1024 needs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from relay.app import SHUTDOWN_GRACE
from tests.daemon import REPO

UNIT = REPO / "deploy" / "ses-relay.service"
LOW_PORTS = REPO / "deploy" / "ses-relay-low-ports.conf"
VENV = "/opt/ses-relay"
"""Where the unit's comments install the relay."""
COMMAND = f"{VENV}/bin/ses-relay"
MAX_EXPOSURE = 2.0
OFFLINE_SINCE = 250
"""The systemd release whose systemd-analyze has ``security --offline``."""


@pytest.fixture(scope="module")
def analyze() -> str:
    """systemd-analyze, or a skip saying why it cannot run here."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    version = subprocess.run(
        [tool, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    found = re.match(r"systemd (\d+)", version)
    if found is None or int(found[1]) < OFFLINE_SINCE:
        pytest.skip(f"systemd-analyze {version[:40]!r} has no `security --offline` (needs 250)")
    return tool


def installed(directory: Path, *, low_ports: bool) -> Path:
    """The unit as installed in ``directory`` (with the drop-in beside it if
    ``low_ports``), its command pointing to a stub: verify checks that the
    command exists, and the relay is not installed in /opt here."""
    text = UNIT.read_text()
    assert text.count(f"={COMMAND} ") == 2, "ExecStartPre= and ExecStart= run the venv's command"
    stub = directory / "ses-relay"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = directory / "ses-relay.service"
    unit.write_text(text.replace(COMMAND, str(stub)))
    if low_ports:
        (directory / "ses-relay.service.d").mkdir()
        shutil.copy(LOW_PORTS, directory / "ses-relay.service.d" / "low-ports.conf")
    return unit


def run(analyze: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def security(analyze: str, unit: Path) -> tuple[float, dict[str, Any]]:
    """The overall exposure and each check's row (by name)."""
    text = run(analyze, "security", "--offline=true", unit.name, cwd=unit.parent)
    score = re.search(r"Overall exposure level for ses-relay\.service: (\d+\.\d)", text.stdout)
    assert score is not None, text.stdout + text.stderr
    rows = run(analyze, "security", "--offline=true", "--json=short", unit.name, cwd=unit.parent)
    return float(score[1]), {row["name"]: row for row in json.loads(rows.stdout)}


def test_the_install_steps_put_the_command_where_the_unit_runs_it() -> None:
    text = UNIT.read_text()
    assert f"python3 -m venv {VENV}\n" in text
    assert f"{VENV}/bin/pip install " in text
    assert "pip install ses-relay" not in text  # it is on no package index


@pytest.mark.parametrize("low_ports", [False, True], ids=["unit", "with-low-ports"])
def test_systemd_verify_is_clean(analyze: str, tmp_path: Path, low_ports: bool) -> None:
    unit = installed(tmp_path, low_ports=low_ports)
    done = run(analyze, "verify", unit.name, cwd=tmp_path)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("low_ports", [False, True], ids=["unit", "with-low-ports"])
def test_systemd_security_exposure_is_low(analyze: str, tmp_path: Path, low_ports: bool) -> None:
    exposure, _ = security(analyze, installed(tmp_path, low_ports=low_ports))
    assert exposure <= MAX_EXPOSURE


def test_the_low_ports_drop_in_grants_only_binding_them(analyze: str, tmp_path: Path) -> None:
    (tmp_path / "unit").mkdir()
    (tmp_path / "low").mkdir()
    _, plain = security(analyze, installed(tmp_path / "unit", low_ports=False))
    _, low = security(analyze, installed(tmp_path / "low", low_ports=True))
    changed = {name for name in plain if plain[name]["set"] != low[name]["set"]}
    assert changed == {
        "AmbientCapabilities=",
        "CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)",
        "PrivateUsers=",
    }
    drop_in = LOW_PORTS.read_text()
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in drop_in
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in drop_in


def test_the_stop_timeout_covers_the_shutdown_grace() -> None:
    found = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.MULTILINE)
    assert found is not None
    assert int(found[1]) >= SHUTDOWN_GRACE + 10


def directives(name: str) -> list[str]:
    return re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE)


def test_systemd_knows_when_the_relay_is_ready_stuck_or_reloading() -> None:
    """What relay/sdnotify.py and relay.app.serve speak (tests/test_sdnotify.py
    and tests/test_reload.py run the daemon as these lines do)."""
    assert directives("Type") == ["notify"]
    assert directives("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    [watchdog] = directives("WatchdogSec")
    assert re.fullmatch(r"\d+s", watchdog)
    assert int(watchdog[:-1]) >= 10  # pings every half of it, with room for a busy loop
    assert "AF_UNIX" in directives("RestrictAddressFamilies")[0].split()  # $NOTIFY_SOCKET
    assert directives("NotifyAccess") in ([], ["main"])
