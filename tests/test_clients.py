"""The README's "Point an application at it": every snippet a program can run,
run as printed by the real client against a real relay and the fake SES.

Each snippet is read from README.md (the fenced block after its
``<!-- snippet: NAME -->`` marker) and only its placeholders are replaced
(``PLACEHOLDERS``: host, port, CA file, paths of the relay's files); the
credentials are the README's own (``app`` / ``app-password``). The relay
runs the README's configuration snippet, with loopback kept out of
``smtp.allowed_networks`` so that nothing relays without AUTH.

What the client put on the wire is what the relay's DATA hook received
(recorded by a spy around ``RelayHandler.handle_DATA``); the fake SES must
have got exactly that, less the header fields the relay removes (``Bcc:``,
``X-SES-*``) and plus the ``Date:``/``Message-ID:`` it adds when missing.

Clients come from Debian (swaks, msmtp, php-cli, postfix) and npm
(nodemailer, ``npm ci --prefix tests/clients``); ``.ci/run`` installs the
missing ones. A test is skipped, naming what to install, only when its
client is absent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from bench.postfix import MASTER_SERVICES
from relay.app import Relay
from relay.auth import hash_password
from relay.handler import RelayHandler
from relay.incoming import IncomingMessage
from tests.fakeses import FakeSes, RecordedRequest
from tests.relayd import running_relay

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NODE_PROJECT = ROOT / "tests" / "clients"

HOST = "relay.example.com"
STARTTLS_PORT = "587"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
USER, PASSWORD = "app", "app-password"
CLIENT_TIMEOUT = 60.0
"""Seconds a client program may take (generous: two cores shared by many)."""

REMOVED_FIELDS = re.compile(rb"(?i)(bcc|resent-bcc|x-ses-[a-z-]+)\s*:")


def readme_snippet(name: str) -> str:
    """The fenced block that follows ``<!-- snippet: name -->`` in README.md."""
    text = README.read_text()
    found = re.findall(
        rf"^<!-- snippet: {re.escape(name)} -->\n```[a-z]*\n(.*?)^```$", text, re.M | re.S
    )
    assert len(found) == 1, f"README.md has {len(found)} snippets named {name!r}"
    return str(found[0])


def substitute(snippet: str, replacements: dict[str, str]) -> str:
    """``snippet`` with each placeholder (as a whole word) replaced; each must occur."""
    for placeholder, value in replacements.items():
        pattern = rf"(?<![\w.]){re.escape(placeholder)}(?![\w])"
        assert re.search(pattern, snippet), f"placeholder {placeholder!r} not in {snippet!r}"
        snippet = value.join(re.split(pattern, snippet))
    return snippet


def need(*programs: str, install: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed ({install})")


# --------------------------------------------------------------------------- the relay


@dataclass
class Site:
    """The relay as the README configures it, and what its DATA hook received."""

    relay: Relay
    received: list[bytes]
    ca_pem: Path
    home: Path

    @property
    def port(self) -> str:
        return str(self.relay.smtp_addresses[0][1])


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every message body the relay's DATA hook was given, as the client sent it."""
    seen: list[bytes] = []
    pieces: dict[str, list[bytes]] = {}
    original = RelayHandler.handle_DATA
    original_write = IncomingMessage.write

    def write(self: IncomingMessage, piece: bytes) -> None:
        pieces.setdefault(self.queue_id, []).append(piece)
        original_write(self, piece)

    async def spy(
        self: RelayHandler, server: Any, session: Any, envelope: Any, message: IncomingMessage
    ) -> str:
        seen.append(b"".join(pieces.pop(message.queue_id, [])))
        return await original(self, server, session, envelope, message)

    monkeypatch.setattr(IncomingMessage, "write", write)
    monkeypatch.setattr(RelayHandler, "handle_DATA", spy)
    return seen


@pytest.fixture
def site_factory(
    tmp_path: Path,
    fake_ses: FakeSes,
    tls_ca: trustme.CA,
    ca_pem_path: Path,
    received: list[bytes],
) -> Callable[..., Any]:
    @asynccontextmanager
    async def start(*names: str) -> AsyncIterator[Site]:
        """The relay of README's ``relay-config`` with a certificate for ``names``."""
        cert = tls_ca.issue_cert(*names)
        files = {
            "/etc/ses-relay/tls/fullchain.pem": tmp_path / "fullchain.pem",
            "/etc/ses-relay/tls/privkey.pem": tmp_path / "privkey.pem",
            "/etc/ses-relay/users": tmp_path / "users",
        }
        cert.cert_chain_pems[0].write_to_path(str(files["/etc/ses-relay/tls/fullchain.pem"]))
        cert.private_key_pem.write_to_path(str(files["/etc/ses-relay/tls/privkey.pem"]))
        files["/etc/ses-relay/users"].write_text(
            f"{USER}:{hash_password(PASSWORD, 'bcrypt', bcrypt_rounds=4)}\n"
        )
        config = tomllib.loads(
            substitute(
                readme_snippet("relay-config"),
                {
                    "0.0.0.0:587": "127.0.0.1:0",
                    "0.0.0.0:465": "127.0.0.1:0",
                    **{placeholder: str(path) for placeholder, path in files.items()},
                },
            )
        )
        config["smtp"]["allowed_networks"] = ["192.0.2.0/24"]  # loopback must AUTH too
        home = tmp_path / "home"
        home.mkdir()
        async with running_relay(tmp_path, fake_ses, **config) as relay:
            yield Site(relay, received, ca_pem_path, home)

    return start


async def run(
    argv: list[str], *, env: dict[str, str], cwd: Path, stdin: bytes = b""
) -> tuple[int, str]:
    """Run a client program while the relay serves; its exit status and output."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT):
            output, _ = await process.communicate(stdin)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def client_env(site: Site, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SES_RELAY_"))}
    return env | {"HOME": str(site.home)} | extra


# --------------------------------------------------------------------------- what SES got


def header_fields(head: bytes) -> list[bytes]:
    """The header block as its fields, each with its continuation lines."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def split_message(raw: bytes) -> tuple[list[bytes], bytes]:
    end = raw.index(b"\r\n\r\n") + 2
    return header_fields(raw[:end]), raw[end:]


def assert_reached_ses(
    site: Site,
    requests: list[RecordedRequest],
    *,
    source: str,
    destinations: list[str],
) -> RecordedRequest:
    """One signed SendRawEmail carried what the client sent, as the README says."""
    [request] = requests
    [sent] = site.received
    assert request.signature_ok
    assert request.action == "SendRawEmail"
    assert request.params["Source"] == source
    assert request.destinations == destinations
    assert request.raw_message is not None
    sent_fields, sent_body = split_message(sent)
    ses_fields, ses_body = split_message(request.raw_message)
    kept = [f for f in sent_fields if not REMOVED_FIELDS.match(f)]
    assert ses_fields[: len(kept)] == kept
    added = [f.split(b":", 1)[0].lower() for f in ses_fields[len(kept) :]]
    missing = [
        name
        for name in (b"date", b"message-id")
        if not any(f.lower().startswith(name + b":") for f in sent_fields)
    ]
    assert added == missing
    assert ses_body == sent_body
    assert not REMOVED_FIELDS.search(request.raw_message.split(b"\r\n\r\n", 1)[0])
    return request


def field(raw: bytes, name: str) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    return re.findall(rf"(?im)^{re.escape(name)}:[ \t]*([^\r\n]*)\r?$", head)


# --------------------------------------------------------------------------- the clients


async def test_swaks_starttls_auth(site_factory: Callable[..., Any], fake_ses: FakeSes) -> None:
    need("swaks", install="apt-get install swaks libnet-ssleay-perl")
    async with site_factory("127.0.0.1") as site:
        command = substitute(
            readme_snippet("swaks"),
            {f"{HOST}:{STARTTLS_PORT}": f"127.0.0.1:{site.port}", SYSTEM_CA: str(site.ca_pem)},
        )
        code, output = await run(["sh", "-c", command], env=client_env(site), cwd=site.home)
        assert code == 0, output
    assert "<~  235 2.7.0 Authentication successful" in output
    request = assert_reached_ses(
        site, fake_ses.requests, source="app@example.com", destinations=["someone@example.net"]
    )
    assert request.params["ConfigurationSetName"] == "transactional"


async def test_python_smtplib_starttls_auth(
    site_factory: Callable[..., Any], fake_ses: FakeSes
) -> None:
    async with site_factory("127.0.0.1") as site:
        script = site.home / "send.py"
        script.write_text(
            substitute(readme_snippet("python"), {HOST: "127.0.0.1", STARTTLS_PORT: site.port})
        )
        code, output = await run(
            [shutil.which("python3") or "python3", str(script)],
            env=client_env(site, SSL_CERT_FILE=str(site.ca_pem)),
            cwd=site.home,
        )
        assert code == 0, output
    request = assert_reached_ses(
        site,
        fake_ses.requests,
        source="app@example.com",
        destinations=["someone@example.net", "archive@example.org"],
    )
    assert request.tags == [("app", "billing"), ("kind", "invoice")]
    assert request.raw_message is not None
    assert field(request.raw_message, "Subject") == ["Invoice 42"]
    assert request.raw_message.endswith(b"\r\n\r\nYour invoice is attached.\r\n")


def write_msmtprc(site: Site) -> None:
    """README's msmtprc as the user's ~/.msmtprc (msmtp wants it private)."""
    rc = site.home / ".msmtprc"
    rc.write_text(
        substitute(
            readme_snippet("msmtprc"),
            {HOST: "127.0.0.1", STARTTLS_PORT: site.port, SYSTEM_CA: str(site.ca_pem)},
        )
    )
    rc.chmod(0o600)


async def test_msmtp_from_a_script(site_factory: Callable[..., Any], fake_ses: FakeSes) -> None:
    need("msmtp", install="apt-get install msmtp")
    message = (
        b"From: Cron <app@example.com>\r\nTo: someone@example.net\r\n"
        b"Bcc: archive@example.org\r\nSubject: nightly backup\r\n"
        b"Date: Mon, 23 Nov 2026 03:00:00 +0000\r\nMessage-ID: <backup-1@example.com>\r\n"
        b"\r\nbackup finished: 42 GB\r\n"
    )
    async with site_factory("127.0.0.1") as site:
        write_msmtprc(site)
        code, output = await run(
            ["msmtp", "-t"], env=client_env(site), cwd=site.home, stdin=message
        )
        assert code == 0, output
    assert_reached_ses(
        site,
        fake_ses.requests,
        source="app@example.com",
        destinations=["someone@example.net", "archive@example.org"],
    )
    assert site.received == [message.replace(b"Bcc: archive@example.org\r\n", b"")]


async def test_php_mail_through_msmtp(site_factory: Callable[..., Any], fake_ses: FakeSes) -> None:
    need("php", "msmtp", install="apt-get install php-cli msmtp")
    async with site_factory("127.0.0.1") as site:
        write_msmtprc(site)
        ini = site.home / "php.ini"
        ini.write_text(readme_snippet("php-ini"))
        script = site.home / "send.php"
        script.write_text(readme_snippet("php"))
        # /usr/bin/msmtp as php.ini names it: Debian's msmtp lives there.
        code, output = await run(
            ["php", "-n", "-c", str(ini), str(script)], env=client_env(site), cwd=site.home
        )
        assert code == 0, output
    request = assert_reached_ses(
        site, fake_ses.requests, source="app@example.com", destinations=["someone@example.net"]
    )
    assert request.params["ConfigurationSetName"] == "transactional"
    assert request.raw_message is not None
    assert field(request.raw_message, "Subject") == ["Your order has shipped"]
    assert field(request.raw_message, "From") == ["Shop <app@example.com>"]
    assert b"\r\n\r\nOrder 1042 left our warehouse today.\r\n" in request.raw_message


async def test_nodemailer_starttls_auth(
    site_factory: Callable[..., Any], fake_ses: FakeSes
) -> None:
    need("node", install="apt-get install nodejs")
    if not (NODE_PROJECT / "node_modules" / "nodemailer").is_dir():
        pytest.skip("nodemailer not installed (npm ci --prefix tests/clients)")
    async with site_factory("127.0.0.1") as site:
        script = site.home / "send.js"
        script.write_text(
            substitute(readme_snippet("nodemailer"), {HOST: "127.0.0.1", STARTTLS_PORT: site.port})
        )
        code, output = await run(
            ["node", str(script)],
            env=client_env(
                site,
                NODE_EXTRA_CA_CERTS=str(site.ca_pem),
                NODE_PATH=str(NODE_PROJECT / "node_modules"),
            ),
            cwd=site.home,
        )
        assert code == 0, output
    assert output.startswith("250 2.0.0 Ok: "), output
    request = assert_reached_ses(
        site,
        fake_ses.requests,
        source="app@example.com",
        destinations=["someone@example.net", "archive@example.org"],
    )
    assert request.params["ConfigurationSetName"] == "alerts"
    assert request.raw_message is not None
    assert field(request.raw_message, "Subject") == ["Disk almost full"]


# --------------------------------------------------------------------------- Postfix


POSTFIX_INSTANCE = """\
# A private instance for the test, never the system's.
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = client.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
smtp_host_lookup = native
smtp_dns_support_level = disabled
maillog_file = {log}
maillog_file_prefixes = {base}
compatibility_level = 3.6
"""

POSTFIX_MASTER = (
    MASTER_SERVICES + "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"
)


def postfix_instance(base: Path, site: Site) -> Path:
    """A private Postfix under ``base`` with README's main.cf and sasl_passwd;
    its config_directory."""
    conf, queue, data = base / "etc", base / "queue", base / "data"
    # Postfix's daemons drop to the postfix user: these must be reachable by
    # it, which pytest's private tmp_path is not.
    base.chmod(0o755)
    for directory in (conf, queue, data):
        directory.mkdir()
    shutil.chown(data, user="postfix")
    sasl_passwd = conf / "sasl_passwd"
    main_cf = substitute(
        readme_snippet("postfix-main-cf"),
        {
            HOST: "localhost",
            STARTTLS_PORT: site.port,
            "/etc/postfix/sasl_passwd": str(sasl_passwd),
            SYSTEM_CA: str(site.ca_pem),
        },
    )
    instance = POSTFIX_INSTANCE.format(queue=queue, data=data, log=base / "maillog", base=base)
    (conf / "main.cf").write_text(main_cf + instance)
    (conf / "master.cf").write_text(POSTFIX_MASTER)
    sasl_passwd.write_text(
        substitute(
            readme_snippet("postfix-sasl-passwd"), {HOST: "localhost", STARTTLS_PORT: site.port}
        )
    )
    sasl_passwd.chmod(0o600)
    return conf


async def test_postfix_relayhost_with_sasl_and_tls(
    site_factory: Callable[..., Any], fake_ses: FakeSes
) -> None:
    """README's main.cf lines in a private Postfix instance (its own
    config_directory and queue_directory, never the system's), mail put in
    with its sendmail; ``smtp_tls_security_level = secure`` checks the
    relay's certificate against the name ``localhost``."""
    need("postfix", "postmap", "sendmail", install="apt-get install postfix")
    message = (
        b"From: root@client.test\r\nTo: someone@example.net\r\nSubject: cron output\r\n"
        b"Date: Mon, 23 Nov 2026 04:00:00 +0000\r\nMessage-ID: <cron-1@client.test>\r\n"
        b"\r\nall good\r\n"
    )
    base = Path(tempfile.mkdtemp(prefix="ses-relay-postfix-"))
    try:
        async with site_factory("localhost") as site:
            conf = postfix_instance(base, site)
            env = client_env(site, MAIL_CONFIG=str(conf))
            postfix = ["postfix", "-c", str(conf)]
            for argv in (["postmap", str(conf / "sasl_passwd")], [*postfix, "start"]):
                code, output = await run(argv, env=env, cwd=base)
                assert code == 0, output
            try:
                code, output = await run(
                    ["sendmail", "-C", str(conf), "-f", "root@client.test", "-t"],
                    env=env,
                    cwd=base,
                    stdin=message,
                )
                assert code == 0, output
                try:
                    requests = await fake_ses.wait_for_requests(1, within=CLIENT_TIMEOUT)
                except TimeoutError:
                    log = (base / "maillog").read_text()
                    pytest.fail(f"Postfix did not deliver; its log:\n{log}")
            finally:
                await run([*postfix, "stop"], env=env, cwd=base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    request = assert_reached_ses(
        site, requests, source="root@client.test", destinations=["someone@example.net"]
    )
    assert request.raw_message is not None
    assert field(request.raw_message, "Subject") == ["cron output"]
    assert request.raw_message.endswith(b"\r\n\r\nall good\r\n")


# --------------------------------------------------------------------------- documents


def test_iam_policy_allows_every_ses_action_the_relay_calls() -> None:
    policy = json.loads(readme_snippet("iam-policy"))
    allowed = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        allowed.update([actions] if isinstance(actions, str) else actions)
    called = set(
        re.findall(
            r'"(SendRawEmail|GetSendQuota|GetIdentityVerificationAttributes|[A-Z]\w+Email\w*)"',
            (ROOT / "relay" / "ses" / "client.py").read_text(),
        )
    )
    assert called == {"SendRawEmail", "GetSendQuota", "GetIdentityVerificationAttributes"}
    assert allowed == {f"ses:{action}" for action in called}


TROUBLE_ROW = re.compile(r"^\| `(\d{3})(?: ([245]\.\d{1,3}\.\d{1,3}))?([^`]*)`", re.M)


def troubleshooting_rows() -> list[tuple[str, str, str]]:
    text = README.read_text()
    start = text.index("### Troubleshooting")
    end = text.index("\n## ", start)
    return TROUBLE_ROW.findall(text[start:end])


def test_troubleshooting_replies_are_ones_the_relay_gives() -> None:
    """Each row's reply (code, enhanced code, the fixed parts of its text) is in relay/."""
    sources = "\n".join(p.read_text() for p in (ROOT / "relay").rglob("*.py"))
    rows = troubleshooting_rows()
    assert len(rows) >= 30
    untrue = []
    for code, enhanced, rest in rows:
        reply = f"{code} {enhanced}{rest}"
        if enhanced and (
            enhanced[0] != code[0]
            or not re.search(rf'"({code} )?{re.escape(enhanced)}[ "]', sources)
        ):
            untrue.append(reply)
        fragments = (f.strip() for f in re.split(r"\.\.\.|\bN\b|:", rest))
        untrue.extend(f"{reply}: {f!r}" for f in fragments if len(f) > 3 and f not in sources)
    assert untrue == []


def test_troubleshooting_covers_every_reply_code_a_client_can_get() -> None:
    codes = {code for code, _, _ in troubleshooting_rows()}
    assert {"421", "451", "452", "454", "502", "530", "535", "538", "550", "552", "553", "554"} <= (
        codes
    )
