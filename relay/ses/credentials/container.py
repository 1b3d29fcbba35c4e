"""The container credentials source (ECS, EKS Pod Identity): the endpoint
from ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` / ``_FULL_URI``, the optional
authorization token, and the GET retried on 5xx, 429 and connection failures."""

from __future__ import annotations

from collections.abc import Mapping

from relay.errors import CredentialsError, CredentialsNotConfigured, CredentialsUnreachable
from relay.ses.credentials.fetch import HEADER_VALUE, Context, http
from relay.ses.credentials.files import read_token_file
from relay.ses.credentials.parsing import container_endpoint, parse_container_credentials
from relay.ses.credentials.providers import Fetch
from relay.ses.sigv4 import Credentials

CONTAINER_TIMEOUT = 2.0
CONTAINER_ATTEMPTS = 3
CONTAINER_RETRY_DELAY = 1.0


def _container_token(env: Mapping[str, str]) -> str | None:
    token_file = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "")
    if token_file:
        token: str | None = read_token_file(token_file, "container authorization token file")
    else:
        token = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN") or None
    if token is not None and not HEADER_VALUE.fullmatch(token):
        raise CredentialsError("container authorization token is not a legal header value")
    return token


def container_plan(ctx: Context) -> Fetch:
    url = container_endpoint(ctx.env)
    if url is None:
        raise CredentialsNotConfigured(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI and _FULL_URI are not set"
        )
    what = "container credentials endpoint"

    async def fetch() -> Credentials:
        headers = {"Accept": "application/json"}
        token = _container_token(ctx.env)
        if token is not None:
            headers["Authorization"] = token
        problem = ""
        for attempt in range(1, CONTAINER_ATTEMPTS + 1):
            if attempt > 1:
                await ctx.sleep(CONTAINER_RETRY_DELAY)
            try:
                status, body = await http(
                    ctx, "GET", url, what=what, headers=headers, seconds=CONTAINER_TIMEOUT
                )
            except CredentialsUnreachable as exc:
                problem = str(exc)
                continue
            if status == 200:
                return parse_container_credentials(body)
            problem = f"{what} at {url.origin()} answered HTTP {status}"
            if status < 500 and status != 429:
                raise CredentialsError(problem)
        raise CredentialsError(f"{problem} ({CONTAINER_ATTEMPTS} attempts)")

    return fetch
