"""``relay.metricsdir``: the metrics directory of a relay with workers is
removed when it stops, and one that a killed relay left behind by the next
start; never one whose relay still runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from relay.metricsdir import GRACE, OWNER, PREFIX, metrics_dir, remove_stale
from tests.daemon import REPO

LATER = 10 * GRACE
"""A clock far enough past every directory's last change."""


def left_by_a_killed_relay(parent: Path) -> Path:
    """A metrics directory made by a process that was then killed (SIGKILL)."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from relay.metricsdir import metrics_dir
        with metrics_dir(Path({str(parent)!r})) as path:
            (path / "counter_1.db").write_bytes(b"x")
            print(path, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert done.returncode == -9, done.stderr
    path = Path(done.stdout.strip())
    assert (path / "counter_1.db").exists()
    return path


def test_the_directory_is_locked_while_in_use_and_removed_after(tmp_path: Path) -> None:
    with metrics_dir(tmp_path) as path:
        assert path.parent == tmp_path
        assert path.name.startswith(PREFIX)
        assert (path / OWNER).exists()
        assert remove_stale(tmp_path, now=os.path.getmtime(path) + LATER) == []
        assert path.exists()  # its relay runs
    assert not path.exists()


def test_a_directory_left_by_a_killed_relay_is_removed_by_the_next_start(tmp_path: Path) -> None:
    stale = left_by_a_killed_relay(tmp_path)
    assert remove_stale(tmp_path) == []  # changed just now: it may be one being made
    assert remove_stale(tmp_path, now=os.path.getmtime(stale) + LATER) == [stale]
    assert not stale.exists()


def test_what_is_not_a_relays_directory_is_left_alone(tmp_path: Path) -> None:
    unlocked = tmp_path / f"{PREFIX}older"  # no lock file: made by an older relay, or not ours
    unlocked.mkdir()
    other = tmp_path / "something-else"
    other.mkdir()
    (other / OWNER).touch()
    link = tmp_path / f"{PREFIX}link"
    link.symlink_to(other)
    assert remove_stale(tmp_path, now=os.path.getmtime(other) + LATER) == []
    assert unlocked.exists()
    assert (other / OWNER).exists()
