"""Run a Python script on a real, tiny file system.

``run(script, tmp_path)`` mounts a fresh tmpfs (1 MiB by default) in a
private mount namespace (``unshare -m``, so nothing leaks to the host's
mounts and the file system vanishes with the process) and runs ``script``
there with this interpreter, the repository importable, and the mount
point as ``sys.argv[1]``. The script reports what it saw as one JSON
document on the last line of its stdout, which ``run`` returns.

It needs root (or CAP_SYS_ADMIN) and ``unshare``; ``unavailable()`` says why
not when it cannot work here, probed once per test run, so tests can skip
with that reason.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# $1 size, $2 mount point, $3 python, $4 script
_SHELL = 'mount -t tmpfs -o size="$1",mode=0700 tmpfs "$2" && exec "$3" "$4" "$2"'


def _command(size: str, mount_point: Path, script: Path) -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    return [unshare, "-m", "--propagation", "private", "sh", "-c", _SHELL, "sh",
            size, str(mount_point), sys.executable, str(script)]  # fmt: skip


@functools.cache
def unavailable() -> str | None:
    """Why a private tmpfs cannot be mounted here, or None when it can."""
    if sys.platform != "linux":
        return f"needs Linux mount namespaces (this is {sys.platform})"
    if shutil.which("unshare") is None:
        return "needs unshare(1) (util-linux), which is not installed"
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace"
    probe = (
        "import os, sys; print(os.statvfs(sys.argv[1]).f_blocks * os.statvfs(sys.argv[1]).f_frsize)"
    )
    with tempfile.TemporaryDirectory(prefix="diskfull-probe-") as tmp:
        script = Path(tmp, "probe.py")
        script.write_text(probe)
        mount_point = Path(tmp, "mnt")
        mount_point.mkdir()
        try:
            done = subprocess.run(
                _command("64k", mount_point, script),
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unshare -m / mount -t tmpfs failed: {exc}"
        if done.returncode != 0:
            why = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()[-1]
            return f"unshare -m / mount -t tmpfs is not allowed here: {why}"
        if done.stdout.strip() != str(64 * 1024):
            return f"the probe did not see a 64 KiB tmpfs: {done.stdout.strip()!r}"
    return None


def run(script: str, tmp_path: Path, *, size: str = "1m", timeout: float = 60) -> Any:
    """Run ``script`` on a fresh tmpfs of ``size``; its last stdout line, as JSON."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    path = tmp_path / "diskfull_script.py"
    path.write_text(script)
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        _command(size, mount_point, path),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"the script on the tmpfs failed (exit status {done.returncode}):\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise AssertionError(f"the script printed nothing; stderr:\n{done.stderr}")
    return json.loads(lines[-1])
