"""SIGHUP reloads the configuration: which changes apply at once and which
wait for a restart (pure), and the real daemon (``python -m relay serve``)
taking a new users file and certificate for new sessions while a session in
flight finishes as it began, refusing an invalid file with one log line, and
naming what needs a restart."""

from __future__ import annotations

import dataclasses
import re
import signal
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from relay.auth import hash_password
from relay.config import SECTIONS, Config, load_config
from relay.reload import LIVE, SWITCHES, plan_reload
from tests.daemon import REPO, Daemon, daemon_config, daemon_env, running_daemon
from tests.fakeses import FakeSes

SENDER = "app@example.com"
WAIT = 15.0


def config(**sections: Mapping[str, Any]) -> Config:
    """A configuration from defaults with ``sections`` overriding keys."""
    base = load_config(None, {})
    return dataclasses.replace(
        base,
        **{
            name: dataclasses.replace(getattr(base, name), **values)
            for name, values in sections.items()
        },
    )


def test_every_live_key_is_a_key() -> None:
    keys = {
        f"{name}.{spec.name}" for name, cls in SECTIONS.items() for spec in dataclasses.fields(cls)
    }
    assert keys >= LIVE
    assert SWITCHES <= LIVE


def test_nothing_changed_changes_nothing() -> None:
    reload = plan_reload(config(), config())
    assert (reload.config, reload.applied, reload.need_restart) == (config(), (), ())


def test_live_changes_apply_and_the_others_keep_their_old_values() -> None:
    old = config(smtp={"listen": ("127.0.0.1:2525",), "max_connections": 10})
    live = {"max_connections": 20, "allowed_networks": ("::1/128",)}
    new = config(
        smtp={"listen": ("127.0.0.1:25",), **live},
        spool={"path": "/elsewhere"},
        delivery={"retry_min": 5.0},
    )
    reload = plan_reload(old, new)
    assert reload.applied == ("smtp.allowed_networks", "smtp.max_connections")  # as in the file
    assert reload.need_restart == ("smtp.listen", "spool.path", "delivery.retry_min")
    assert reload.config == config(smtp={"listen": ("127.0.0.1:2525",), **live})


@pytest.mark.parametrize(
    ("section", "key", "was", "now", "live"),
    [
        ("smtp", "tls_cert", "/a.pem", "/b.pem", True),
        ("smtp", "tls_cert", "", "/b.pem", False),  # STARTTLS offered: a restart
        ("smtp", "tls_key", "/a.key", "", False),
        ("auth", "users_file", "/etc/users", "/etc/users.new", True),
        ("auth", "users_file", "", "/etc/users", False),  # AUTH offered: a restart
        ("auth", "max_failures", 10, 3, False),  # the failure counts are kept
        ("ses", "configuration_set", "", "tracking", True),
        ("ses", "region", "us-east-1", "eu-west-1", False),
    ],
)
def test_turning_tls_or_auth_on_or_off_needs_a_restart(
    section: str, key: str, was: object, now: object, live: bool
) -> None:
    reload = plan_reload(config(**{section: {key: was}}), config(**{section: {key: now}}))
    name = f"{section}.{key}"
    assert (reload.applied, reload.need_restart) == (((name,), ()) if live else ((), (name,)))
    assert getattr(getattr(reload.config, section), key) == (now if live else was)


# The daemon.


def write_cert(cert: trustme.LeafCert, directory: Path) -> bytes:
    """Write ``cert`` where the configuration names it; its DER form."""
    cert.cert_chain_pems[0].write_to_path(str(directory / "relay.pem"))
    cert.private_key_pem.write_to_path(str(directory / "relay.key"))
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def write_users(path: Path, password: str) -> None:
    path.write_text(f"alice:{hash_password(password, 'bcrypt', bcrypt_rounds=4)}\n")


def client(address: tuple[str, int], ca_pem_path: Path, *, implicit: bool) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname=address[0],
        port=address[1],
        use_tls=implicit,
        start_tls=False,
        tls_context=ssl.create_default_context(cafile=str(ca_pem_path)),
        timeout=WAIT,
    )


async def tls_session(
    address: tuple[str, int], ca_pem_path: Path, *, implicit: bool
) -> tuple[aiosmtplib.SMTP, bytes]:
    """A connected client under TLS (STARTTLS unless ``implicit``), and the
    certificate the relay showed."""
    smtp = client(address, ca_pem_path, implicit=implicit)
    await smtp.connect()
    await smtp.ehlo()
    if not implicit:
        await smtp.starttls()
        await smtp.ehlo()
    peer = smtp.get_transport_info("ssl_object").getpeercert(binary_form=True)
    return smtp, peer


def tls_address(daemon: Daemon) -> tuple[str, int]:
    found = re.search(r"listening on ([\d.]+):(\d+) \(implicit TLS\)", daemon.log)
    assert found is not None, daemon.log
    return found[1], int(found[2])


def message(subject: str) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <bob@example.net>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n\r\nHello.\r\n"
    ).encode()


async def reload(daemon: Daemon, pattern: str) -> str:
    """SIGHUP, and the log line it brings."""
    start = len(daemon.lines)
    daemon.signal(signal.SIGHUP)
    return await daemon.wait_for_log(pattern, WAIT, start=start)


async def test_new_sessions_get_the_new_users_and_certificate_and_one_in_flight_finishes(
    tmp_path: Path, fake_ses: FakeSes, tls_ca: trustme.CA, ca_pem_path: Path
) -> None:
    old_cert = write_cert(tls_ca.issue_cert("relay.test", "127.0.0.1"), tmp_path)
    users = tmp_path / "users"
    write_users(users, "old-secret")
    path = daemon_config(
        tmp_path / "relay.toml",
        fake_ses,
        spool=tmp_path / "spool",
        smtp={
            "tls_listen": ["127.0.0.1:0"],
            "tls_cert": str(tmp_path / "relay.pem"),
            "tls_key": str(tmp_path / "relay.key"),
            "allowed_networks": ["192.0.2.0/24"],  # we relay only after AUTH
        },
        auth={"users_file": str(users), "failure_delay": 0.0},
    )
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        assert daemon.smtp is not None
        before, shown = await tls_session(daemon.smtp, ca_pem_path, implicit=False)
        assert shown == old_cert
        await before.login("alice", "old-secret")
        await before.mail(SENDER)
        await before.rcpt("bob@example.net")

        new_cert = write_cert(tls_ca.issue_cert("relay.test", "127.0.0.1"), tmp_path)
        write_users(users, "new-secret")
        line = await reload(daemon, "reloaded ")
        assert line.endswith(
            f"reloaded {path}: new sessions get the same settings; "
            "read again: the TLS certificate and key, the users file"
        )

        for implicit in (True, False):
            address = tls_address(daemon) if implicit else daemon.smtp
            after, shown = await tls_session(address, ca_pem_path, implicit=implicit)
            async with after:
                assert shown == new_cert
                with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                    await after.login("alice", "old-secret")
                assert refused.value.code == 535
                assert (await after.login("alice", "new-secret")).code == 235
                reply, _ = await after.sendmail(SENDER, ["bob@example.net"], message("after"))
                assert reply == {}

        # The session opened before the reload finishes its transaction.
        response = await before.data(message("before"))
        assert response.code == 250, response
        await before.quit()
    raws = [request.raw_message or b"" for request in fake_ses.requests]
    subjects = sorted(re.findall(rb"Subject: (\w+)", raw) for raw in raws)
    assert subjects == [[b"after"], [b"after"], [b"before"]]


async def test_an_invalid_file_is_refused_and_sessions_keep_their_settings(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    def write(**smtp: Any) -> Path:
        return daemon_config(tmp_path / "relay.toml", fake_ses, spool=tmp_path / "spool", smtp=smtp)

    path = write()
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        assert daemon.smtp is not None
        host, port = daemon.smtp
        async with aiosmtplib.SMTP(hostname=host, port=port, timeout=WAIT) as before:
            await before.mail(SENDER)

            # Invalid: nothing of it applies, not even the valid allowed_networks.
            write(max_recipients=0, allowed_networks=["192.0.2.0/24"])
            line = await reload(daemon, "reload refused")
            assert line.endswith(
                "reload refused, the configuration in force is unchanged: "
                f"{path}: [smtp] max_recipients: must be greater than 0"
            )
            assert daemon.count_log("max_recipients") == 1
            assert daemon.count_log("reloaded ") == 0
            async with aiosmtplib.SMTP(hostname=host, port=port, timeout=WAIT) as other:
                reply, _ = await other.sendmail(SENDER, ["a@example.net"], message("refused"))
                assert reply == {}

            write(max_recipients=1)
            line = await reload(daemon, "reloaded ")
            assert line.endswith(f"reloaded {path}: new sessions get smtp.max_recipients")
            async with aiosmtplib.SMTP(hostname=host, port=port, timeout=WAIT) as after:
                await after.mail(SENDER)
                await after.rcpt("a@example.net")
                with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                    await after.rcpt("b@example.net")
                assert (refused.value.code, refused.value.message) == (
                    452,
                    "4.5.3 Too many recipients",
                )

            # The session from before both reloads keeps its limit.
            await before.rcpt("a@example.net")
            await before.rcpt("b@example.net")
            assert (await before.data(message("before"))).code == 250
    destinations = sorted(tuple(request.destinations) for request in fake_ses.requests)
    assert destinations == [("a@example.net",), ("a@example.net", "b@example.net")]


async def test_a_setting_that_needs_a_restart_is_named_and_the_old_one_stays(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    def write(spool: Path, **smtp: Any) -> Path:
        return daemon_config(tmp_path / "relay.toml", fake_ses, spool=spool, smtp=smtp)

    path = write(tmp_path / "spool")
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        assert daemon.smtp is not None
        write(tmp_path / "elsewhere", listen=["127.0.0.1:2"], max_connections=50)
        line = await reload(daemon, "need a restart")
        assert line.endswith(
            "reload: smtp.listen, spool.path changed but need a restart; "
            "the old values stay in force until then"
        )
        await daemon.wait_for_log(f"reloaded {path}: new sessions get smtp.max_connections$")
        host, port = daemon.smtp
        async with aiosmtplib.SMTP(hostname=host, port=port, timeout=WAIT) as smtp:
            reply, _ = await smtp.sendmail(SENDER, ["a@example.net"], message("kept"))
        assert reply == {}
    assert not (tmp_path / "elsewhere").exists()
    assert [request.destinations for request in fake_ses.requests] == [["a@example.net"]]


def test_the_readme_lists_what_a_reload_applies() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Reloading (SIGHUP)") :]
    section = section[: section.index("\n## ")]
    missing = [
        key
        for key in sorted(LIVE)
        if f"{key.split('.')[1]}`" not in section and f"[{key}.NAME]`" not in section
    ]
    assert missing == []
