"""The container image as the Dockerfile describes it, read without Docker.

``Image`` holds what the final stage sets (environment, command, healthcheck,
stop signal, exposed ports, volumes) and which file of this repository each
``COPY`` puts where, so a test can load the configuration the image's relay
would load (``config``) and run the image's healthcheck script from here.
The Dockerfile is parsed with dockerfile-parse (line continuations, ``ENV``
quoting and the JSON exec form are its job).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser

from relay.config import Config, load_config
from tests.daemon import REPO


@dataclass
class Image:
    """The final stage of the Dockerfile."""

    env: dict[str, str]
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    """The HEALTHCHECK's command (exec form)."""
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    stopsignal: str = "SIGTERM"
    exposed: set[int] = field(default_factory=set)
    volumes: list[str] = field(default_factory=list)
    copied: dict[str, Path] = field(default_factory=dict)
    """Path in the image → the repository's file copied there."""

    @property
    def argv(self) -> list[str]:
        return self.entrypoint + self.cmd

    def source(self, path_in_image: str) -> Path:
        """The repository file the image has at ``path_in_image``."""
        assert path_in_image in self.copied, f"the Dockerfile copies nothing to {path_in_image}"
        return self.copied[path_in_image]

    def config_path(self) -> str | None:
        """The ``-c`` file of the image's command, None without one."""
        argv = self.argv
        for flag in ("-c", "--config"):
            if flag in argv:
                return argv[argv.index(flag) + 1]
        return None

    def config(self, env: Mapping[str, str] = {}) -> Config:
        """The configuration ``ses-relay serve`` loads in the image, with ``env``
        added to the image's environment."""
        path = self.config_path()
        return load_config(None if path is None else self.source(path), self.env | dict(env))


def read_image(dockerfile: Path = REPO / "Dockerfile") -> Image:
    parser = DockerfileParser(path=str(dockerfile))
    image = Image(env=dict(parser.envs))
    for instruction in parser.structure:
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "FROM":  # only the final stage counts
            image = Image(env=image.env)
        elif kind == "ENTRYPOINT":
            image.entrypoint = json.loads(value)
        elif kind == "CMD":
            image.cmd = json.loads(value)
        elif kind == "HEALTHCHECK":
            options, _, command = value.partition("CMD ")
            image.healthcheck = json.loads(command)
            image.healthcheck_options = dict(
                option.removeprefix("--").split("=", 1) for option in shlex.split(options)
            )
        elif kind == "STOPSIGNAL":
            image.stopsignal = value.strip()
        elif kind == "EXPOSE":
            image.exposed |= {int(port.split("/")[0]) for port in value.split()}
        elif kind == "VOLUME":
            image.volumes += json.loads(value) if value.startswith("[") else value.split()
        elif kind == "COPY":
            *sources, destination = shlex.split(value)
            if not any(source.startswith("--from=") for source in sources):
                for source in sources:
                    target = destination
                    if destination.endswith("/"):
                        target += Path(source).name
                    image.copied[target] = REPO / source
    return image
