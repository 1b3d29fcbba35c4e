"""The container image (Dockerfile, deploy/docker/) and the README's
``docker run``, checked without a Docker engine: the configuration the image's
relay loads, driven through a real listener with the client addresses a
published port and a neighbouring container give; the image's healthcheck run
against a real relay; the stop signal and timeout against the shutdown grace."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from relay.app import SHUTDOWN_GRACE, Relay
from relay.config import split_host_port
from tests.daemon import daemon_env
from tests.fakeses import FakeSes
from tests.image import REPO, Image, read_image
from tests.test_e2e import SENDER, message, proxy_v1, read_reply


@pytest.fixture(scope="module")
def image() -> Image:
    return read_image()


def documented_docker_run() -> list[str]:
    """The README's ``docker run`` command, as its words."""
    readme = (REPO / "README.md").read_text()
    commands = [
        line
        for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("docker run ")
    ]
    assert len(commands) == 1, f"expected one `docker run` in README.md, found {commands}"
    return shlex.split(commands[0], comments=True)


def image_env(image: Image, fake: FakeSes, spool: Path) -> dict[str, str]:
    """The image's environment around a relay on loopback that believes PROXY
    headers from 127.0.0.1, so a test can be any client address."""
    return (
        daemon_env(fake)
        | image.env
        | {
            "STATE_DIRECTORY": str(spool),
            "SES_RELAY_SMTP_LISTEN": "127.0.0.1:0",
            "SES_RELAY_METRICS_LISTEN": "127.0.0.1:0",
            "SES_RELAY_SMTP_PROXY_PROTOCOL": "true",
            "SES_RELAY_SMTP_PROXY_TRUSTED_NETWORKS": "127.0.0.1/32",
            "SES_RELAY_SES_MAX_SEND_RATE": "1000",
            "AWS_ENDPOINT_URL_SES": fake.url,
            "AWS_CA_BUNDLE": fake.ca_pem_path,
            "AWS_REGION": fake.region,
        }
    )


async def transaction(host: str, port: int, source: str) -> list[bytes]:
    """A message from ``source`` (named in a PROXY header): every reply."""
    reader, writer = await asyncio.open_connection(host, port)
    replies = []
    try:
        writer.write(proxy_v1(source))
        replies.append(await read_reply(reader))
        for line in (b"EHLO client.test", f"MAIL FROM:<{SENDER}>".encode()):
            writer.write(line + b"\r\n")
            replies.append(await read_reply(reader))
        if replies[-1].startswith(b"250 "):
            for line in (b"RCPT TO:<bob@example.net>", b"DATA"):
                writer.write(line + b"\r\n")
                replies.append(await read_reply(reader))
            writer.write(message() + b".\r\n")
            replies.append(await read_reply(reader))
        writer.write(b"QUIT\r\n")
        replies.append(await read_reply(reader))
    finally:
        writer.close()
        await writer.wait_closed()
    return replies


async def test_the_image_relays_for_the_host_and_neighbours_not_the_world(
    tmp_path: Path, fake_ses: FakeSes, image: Image
) -> None:
    """With the image's configuration, a client on the host (through the port
    published on 127.0.0.1, it arrives from the bridge's gateway) and one in a
    neighbouring container may relay; an address from elsewhere may not."""
    config = image.config(image_env(image, fake_ses, tmp_path / "spool"))
    relay = Relay(config, image_env(image, fake_ses, tmp_path / "spool"))
    await relay.start()
    try:
        host, port = relay.smtp_addresses[0]
        replies = {
            source: await transaction(host, port, source)
            for source in ("172.17.0.1", "172.18.0.5", "203.0.113.9", "192.168.1.20")
        }
    finally:
        await relay.stop(grace=1.0)
    for source in ("172.17.0.1", "172.18.0.5"):  # the host; a container on a user network
        codes = [int(reply[:3]) for reply in replies[source]]
        assert codes == [220, 250, 250, 250, 354, 250, 221], replies[source]
    for source in ("203.0.113.9", "192.168.1.20"):  # the world; a LAN behind a wider -p
        assert replies[source][2] == b"530 5.7.0 Authentication required\r\n"
    sent = [r for r in fake_ses.requests if r.params.get("Action") == "SendRawEmail"]
    assert len(sent) == 2


def test_the_documented_docker_run_publishes_on_the_host_loopback_only(image: Image) -> None:
    run = documented_docker_run()
    published = [run[i + 1] for i, word in enumerate(run) if word in ("-p", "--publish")]
    config = image.config()
    ports = {split_host_port(listen)[1] for listen in config.smtp.listen}
    ports.add(split_host_port(config.metrics.listen)[1])
    assert published, run
    for mapping in published:
        address, _, container_port = mapping.split(":")
        assert address == "127.0.0.1", f"{mapping}: published beyond the host"
        assert int(container_port) in ports & image.exposed, mapping
    volumes = [run[i + 1].split(":")[1] for i, word in enumerate(run) if word in ("-v", "--volume")]
    assert volumes == [config.spool.path] == image.volumes


def test_the_stop_timeout_covers_the_shutdown_grace(image: Image) -> None:
    """Docker kills after --stop-timeout (10 s by default): the documented
    command must leave the relay its grace and a margin."""
    run = documented_docker_run()
    assert image.stopsignal == "SIGTERM"  # what starts the graceful stop
    assert "--stop-timeout" in run, run
    assert int(run[run.index("--stop-timeout") + 1]) >= SHUTDOWN_GRACE + 10


def load_healthcheck(image: Image) -> ModuleType:
    script = image.source(image.healthcheck[1])
    spec = importlib.util.spec_from_file_location("healthcheck", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_healthcheck_reads_the_configuration_the_relay_reads(image: Image) -> None:
    assert image.healthcheck[0] == "python"
    assert image.healthcheck[2:] == [image.config_path()]
    seconds = float(image.healthcheck_options["timeout"].removesuffix("s"))
    script = load_healthcheck(image)
    assert seconds > script.TIMEOUT
    url = script.healthz_url
    assert url(image.config().metrics.listen) == "http://127.0.0.1:9465/healthz"
    assert url("[::]:9100") == "http://[::1]:9100/healthz"
    assert url("10.1.2.3:9100") == "http://10.1.2.3:9100/healthz"


def healthcheck(image: Image, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run here on the image's configuration."""
    script, config = (str(image.source(path)) for path in image.healthcheck[1:])
    return subprocess.run(
        [sys.executable, script, config],
        env=env | {"PYTHONPATH": str(REPO), "http_proxy": "http://127.0.0.1:9/", "no_proxy": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
    )


async def test_the_healthcheck_follows_metrics_listen(
    tmp_path: Path, fake_ses: FakeSes, image: Image
) -> None:
    """Metrics moved by the environment: the check asks there, and fails once
    the relay is gone (a proxy in the environment is not used)."""
    env = image_env(image, fake_ses, tmp_path / "spool")
    relay = Relay(image.config(env), env)
    await relay.start()
    try:
        assert relay.metrics_address is not None
        host, port = relay.metrics_address
        env["SES_RELAY_METRICS_LISTEN"] = f"{host}:{port}"
        alive = await asyncio.to_thread(healthcheck, image, env)
    finally:
        await relay.stop(grace=1.0)
    gone = await asyncio.to_thread(healthcheck, image, env)
    url = f"http://{host}:{port}/healthz"
    assert (alive.returncode, alive.stdout) == (0, f"healthy: {url}: 200\n"), alive.stderr
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"unhealthy: {url}: "), gone.stderr


def test_the_healthcheck_reports_an_invalid_configuration(image: Image) -> None:
    done = healthcheck(image, {"SES_RELAY_METRICS_LISTEN": "nowhere"})
    assert done.returncode == 1
    assert done.stderr == (
        "unhealthy: invalid configuration: environment SES_RELAY_METRICS_LISTEN: "
        "expected host:port, like 127.0.0.1:2525 or [::1]:2525\n"
    )
