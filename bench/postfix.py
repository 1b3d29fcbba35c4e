"""The reference target: Postfix relaying to ``smtp-sink``.

A private Postfix instance, never the system's: its own ``main.cf`` and
``master.cf``, queue, data directory and log, all under the scenario's
directory (``postfix -c DIR start-fg``, so its master stays our child's
child). Its ``smtpd`` listens on a loopback port and relays everything,
as ``relayhost``, to ``smtp-sink`` on another, without TLS and without
DNS. The durability is Postfix's own: its ``cleanup`` fsyncs each queue
file before ``smtpd`` answers ``250``.

Postfix's master must start as root (its daemons then run as the
``postfix`` user), so the target is there only when the benchmark runs as
root with ``postfix`` and ``smtp-sink`` installed (Debian's ``postfix``).
The ports are picked free and then handed to Postfix, which binds them a
moment later: on a loopback nobody else is likely to take them meanwhile.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Child, ChildFailed, Children, ProcessTree
from bench.services import READY_TIMEOUT, Server, launch

SBIN = os.pathsep.join(["/usr/sbin", "/usr/lib/postfix/sbin"])
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
SINK_BACKLOG = 256
SOCKET_PATH_MAX = 107
"""The longest path of a Unix socket (``sun_path`` holds 108 bytes with the NUL)."""
_SENT = re.compile(r" status=sent ")
PROBLEM = re.compile(r"(warning|error|fatal|panic): ")

MAIN_CF = """\
# A private instance for the benchmark, never the system's.
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtp_tls_security_level = none
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
compatibility_level = 3.6
"""

MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
"""The daemons a private Postfix needs besides a listener (also used by
tests/test_clients.py, which adds ``tlsmgr``)."""

MASTER_CF = "127.0.0.1:{port} inet n - n - - smtpd\n" + MASTER_SERVICES


def commands() -> tuple[str, str] | None:
    """``postfix`` and ``smtp-sink``, when both are installed and we are root."""
    postfix = shutil.which("postfix", path=SBIN)
    sink = shutil.which("smtp-sink", path=SBIN)
    if postfix is None or sink is None or os.geteuid() != 0:
        return None
    return postfix, sink


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(child: Child, port: int, timeout: float) -> None:
    """Until 127.0.0.1:port takes a connection, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            if child.process.poll() is not None or time.monotonic() >= deadline:
                raise child.failed(f"did not listen on 127.0.0.1:{port}") from None
            time.sleep(0.05)
        else:
            return


@dataclass
class PostfixDownstream:
    """Postfix delivers to smtp-sink: delivered is what its log says was sent."""

    base: Path

    def log(self) -> str:
        try:
            return (self.base / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def delivered(self) -> int:
        return len(_SENT.findall(self.log()))

    def queue_empty(self) -> bool:
        queue = self.base / "queue"
        return not any(any(p.is_file() for p in (queue / q).rglob("*")) for q in QUEUES)


def _master_pid(base: Path, child: Child) -> int:
    path = base / "queue" / "pid" / "master.pid"
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            if child.process.poll() is not None or time.monotonic() >= deadline:
                raise child.failed(f"wrote no {path}") from None
            time.sleep(0.05)


def start_postfix(children: Children, base: Path, postfix: str, sink: str) -> Server:
    """smtp-sink, then the private Postfix relaying to it; ready when its
    smtpd port takes connections."""
    for directory in (base / "etc", base / "queue", base / "data"):
        directory.mkdir(parents=True)
    longest_socket = base / "queue" / "private" / "postfix-scheduler"
    if len(bytes(longest_socket)) > SOCKET_PATH_MAX:
        raise ChildFailed(
            f"Postfix's sockets, such as {longest_socket}, would be longer than "
            f"{SOCKET_PATH_MAX} bytes: give --tmp-dir a shorter directory"
        )
    for directory in base.parents:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise ChildFailed(
                f"Postfix's daemons, as the postfix user, cannot reach {directory}: "
                "give --tmp-dir a directory every user may traverse"
            )
    shutil.chown(base / "data", user="postfix")
    sink_port, port = free_port(), free_port()
    sink_child = children.add(
        Child(
            "smtp-sink",
            [sink, "-u", "postfix", f"127.0.0.1:{sink_port}", str(SINK_BACKLOG)],
            base / "smtp-sink.log",
            os.environ,
        )
    )
    wait_for_port(sink_child, sink_port, READY_TIMEOUT)
    (base / "etc" / "main.cf").write_text(MAIN_CF.format(base=base, sink_port=sink_port))
    (base / "etc" / "master.cf").write_text(MASTER_CF.format(port=port))
    argv = [postfix, "-c", str(base / "etc"), "start-fg"]
    child, fsyncs = launch(children, "postfix", argv, base / "postfix.log", os.environ)
    downstream = PostfixDownstream(base)
    try:
        master = _master_pid(base, child)
        # Registered at once: the master runs in its own session, so only
        # the server's stop() reaches it.
        server = children.add(
            Server(child, port, ProcessTree(master), fsyncs, downstream, base / "maillog", PROBLEM)
        )
        wait_for_port(child, port, READY_TIMEOUT)
    except ChildFailed as failure:
        raise ChildFailed(f"{failure}\nits maillog:\n{downstream.log()}") from None
    return server
