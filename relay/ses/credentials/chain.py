"""The default chain: the environment and profile sources (web identity,
assume role with ``source_profile`` or ``credential_source``, static keys in
the shared files), and ``default_chain``, which tries every source in the
SDKs' order and then keeps asking the one that answered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

import aiohttp

from relay.errors import CredentialsError, CredentialsNotConfigured
from relay.log import ses_log
from relay.ses.credentials.container import container_plan
from relay.ses.credentials.fetch import Context, Sleep, sts_call
from relay.ses.credentials.files import SharedFiles, load_shared_files, read_token_file
from relay.ses.credentials.imds import imds_plan
from relay.ses.credentials.parsing import (
    credentials_from_env,
    credentials_from_profile,
    select_profile,
)
from relay.ses.credentials.providers import (
    Clock,
    CredentialProvider,
    Fetch,
    RefreshingProvider,
    utcnow,
)
from relay.ses.sigv4 import Credentials


def _session_name(ctx: Context) -> str:
    return f"ses-relay-{int(ctx.clock().timestamp())}"


# --------------------------------------------------------------------------- sources
#
# A "plan" looks at configuration only and either raises CredentialsNotConfigured (skip
# me), raises CredentialsError (configured but wrong), or returns the Fetch that
# gets credentials (and refreshes them later).


def _env_plan(ctx: Context) -> Fetch:
    creds = credentials_from_env(ctx.env)
    if creds is None:
        raise CredentialsNotConfigured("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set")
    env = ctx.env

    async def fetch() -> Credentials:
        found = credentials_from_env(env)
        if found is None:  # pragma: no cover - the mapping is a private copy
            raise CredentialsError("environment: credentials disappeared")
        return found

    return fetch


def _web_identity_plan(ctx: Context, files: SharedFiles, profile: str, *, use_env: bool) -> Fetch:
    section = files.profile(profile)

    def setting(variable: str, key: str) -> str:
        value = ctx.env.get(variable, "").strip() if use_env else ""
        return value or section.get(key, "").strip()

    token_file = setting("AWS_WEB_IDENTITY_TOKEN_FILE", "web_identity_token_file")
    if not token_file:
        where = "AWS_WEB_IDENTITY_TOKEN_FILE is not set and " if use_env else ""
        raise CredentialsNotConfigured(f"{where}profile {profile!r} has no web_identity_token_file")
    role_arn = setting("AWS_ROLE_ARN", "role_arn")
    if not role_arn:
        raise CredentialsError(
            f"web identity: a token file is configured but no role ARN "
            f"(set AWS_ROLE_ARN or role_arn in profile {profile!r})"
        )
    session_name = setting("AWS_ROLE_SESSION_NAME", "role_session_name") or _session_name(ctx)

    async def fetch() -> Credentials:
        token = read_token_file(token_file, "web identity token file")
        params = [
            ("RoleArn", role_arn),
            ("RoleSessionName", session_name),
            ("WebIdentityToken", token),
        ]
        return await sts_call(ctx, "AssumeRoleWithWebIdentity", params, signed_with=None)

    return fetch


def _has_static(section: Mapping[str, str]) -> bool:
    return "aws_access_key_id" in section or "aws_secret_access_key" in section


def _has_assume_role(section: Mapping[str, str]) -> bool:
    return "role_arn" in section and "web_identity_token_file" not in section


def _file_static_plan(ctx: Context, files: SharedFiles, profile: str, *, config: bool) -> Fetch:
    path = files.config_path if config else files.credentials_path
    sections = files.config if config else files.credentials
    what = "shared config file" if config else "shared credentials file"
    if path is None:
        raise CredentialsNotConfigured(f"{what} cannot be located: HOME is not set")
    section = sections.get(profile)
    if section is None:
        raise CredentialsNotConfigured(f"no profile {profile!r} in {path}")
    where = f"profile {profile!r} in {path}"
    if credentials_from_profile(section, where) is None:
        raise CredentialsNotConfigured(f"{where} has no aws_access_key_id")
    env = ctx.env

    async def fetch() -> Credentials:
        # Re-read: after invalidate(), rotated keys in the file are picked up.
        fresh = load_shared_files(env)
        found = credentials_from_profile(
            (fresh.config if config else fresh.credentials).get(profile, {}), where
        )
        if found is None:
            raise CredentialsError(f"{where}: the keys were removed")
        return found

    return fetch


_SSO_KEYS = ("sso_role_name", "sso_account_id")


def _refuse_unsupported(section: Mapping[str, str], profile: str, keys: Iterable[str]) -> None:
    for key in keys:
        if key in section:
            raise CredentialsError(
                f"profile {profile!r} uses {key}, which ses-relay does not support; "
                "give it static keys or a role_arn with source_profile instead"
            )


def _profile_chain(
    ctx: Context, files: SharedFiles, profile: str, *, use_env: bool
) -> Iterable[tuple[str, Callable[[], Fetch]]]:
    """botocore's profile providers, in order: web identity, (SSO), shared
    credentials file, (login, process), shared config file."""
    section = files.profile(profile)

    def credentials_file() -> Fetch:
        _refuse_unsupported(section, profile, _SSO_KEYS)
        return _file_static_plan(ctx, files, profile, config=False)

    def config_file() -> Fetch:
        _refuse_unsupported(section, profile, ("login_session", "credential_process"))
        return _file_static_plan(ctx, files, profile, config=True)

    yield "web identity", lambda: _web_identity_plan(ctx, files, profile, use_env=use_env)
    yield "shared credentials file", credentials_file
    yield "shared config file", config_file


def _assume_role_plan(ctx: Context, files: SharedFiles, profile: str, visited: list[str]) -> Fetch:
    """STS AssumeRole for a profile with ``role_arn``; botocore's rules for
    ``source_profile`` (loops refused, a profile may source its own static keys)
    and ``credential_source``."""
    section = files.profile(profile)
    role_arn = section["role_arn"]
    source_profile = section.get("source_profile", "").strip()
    credential_source = section.get("credential_source", "").strip()
    if source_profile and credential_source:
        raise CredentialsError(f"profile {profile!r} has both source_profile and credential_source")
    if not source_profile and not credential_source:
        raise CredentialsError(
            f"profile {profile!r} has role_arn but no source_profile or credential_source"
        )
    _refuse_unsupported(section, profile, ("mfa_serial",))
    source: CredentialProvider
    if credential_source:
        source = _named_source(ctx, credential_source, profile)
    else:
        if not files.has_profile(source_profile):
            raise CredentialsError(
                f"source_profile {source_profile!r} of profile {profile!r} does not exist"
            )
        if source_profile in visited and (
            source_profile != profile or not _has_static(files.profile(source_profile))
        ):
            chain = " -> ".join([*visited, source_profile])
            raise CredentialsError(f"source_profile loop: {chain}")
        visited.append(source_profile)
        source = _source_profile_provider(ctx, files, source_profile, visited)

    params = [
        ("RoleArn", role_arn),
        ("RoleSessionName", section.get("role_session_name") or _session_name(ctx)),
    ]
    if section.get("duration_seconds", "").strip().isdigit():
        params.append(("DurationSeconds", section["duration_seconds"].strip()))
    if section.get("external_id"):
        params.append(("ExternalId", section["external_id"]))

    async def fetch() -> Credentials:
        return await sts_call(ctx, "AssumeRole", params, signed_with=await source.get())

    return fetch


def _source_profile_provider(
    ctx: Context, files: SharedFiles, profile: str, visited: list[str]
) -> CredentialProvider:
    section = files.profile(profile)
    if _has_static(section) or not _has_assume_role(section):
        for _label, plan in _profile_chain(ctx, files, profile, use_env=False):
            try:
                fetch = plan()
            except CredentialsNotConfigured:
                continue
            return RefreshingProvider(fetch, name=f"source profile {profile!r}", clock=ctx.clock)
        raise CredentialsError(f"source profile {profile!r} has no credentials")
    return RefreshingProvider(
        _assume_role_plan(ctx, files, profile, visited),
        name=f"role of profile {profile!r}",
        clock=ctx.clock,
    )


def _named_source(ctx: Context, name: str, profile: str) -> CredentialProvider:
    key = name.lower()
    plan: Callable[[Context], Fetch]
    if key == "environment":
        plan = _env_plan
    elif key == "ecscontainer":
        plan = container_plan
    elif key == "ec2instancemetadata":
        plan = imds_plan
    else:
        raise CredentialsError(
            f"credential_source {name!r} in profile {profile!r} is not one of "
            "Environment, EcsContainer, Ec2InstanceMetadata"
        )
    try:
        fetch = plan(ctx)
    except CredentialsNotConfigured as exc:
        raise CredentialsError(f"credential_source {name} of profile {profile!r}: {exc}") from None
    return RefreshingProvider(fetch, name=f"credential_source {name}", clock=ctx.clock)


# --------------------------------------------------------------------------- the chain


class _Chain:
    """The default chain as one Fetch: the first call finds the source, later
    calls (refreshes) ask that source again."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._selected: Fetch | None = None

    async def fetch(self) -> Credentials:
        if self._selected is not None:
            return await self._selected()
        fetch, creds = await self._resolve()
        self._selected = fetch
        return creds

    def _steps(self) -> Iterable[tuple[str, Callable[[], Fetch]]]:
        ctx = self._ctx
        yield "environment", lambda: _env_plan(ctx)
        files = load_shared_files(ctx.env)
        profile, chosen_by = select_profile(ctx.env)
        if chosen_by is not None and not files.has_profile(profile):
            raise CredentialsError(
                f"profile {profile!r} (from {chosen_by}) is not in "
                f"{files.credentials_path} or {files.config_path}"
            )

        def assume_role() -> Fetch:
            if not _has_assume_role(files.profile(profile)):
                raise CredentialsNotConfigured(f"profile {profile!r} has no role_arn")
            return _assume_role_plan(ctx, files, profile, [profile])

        yield "assume role", assume_role
        yield from _profile_chain(ctx, files, profile, use_env=True)
        yield "container credentials", lambda: container_plan(ctx)
        yield "EC2 instance metadata", lambda: imds_plan(ctx)

    async def _resolve(self) -> tuple[Fetch, Credentials]:
        skipped: list[str] = []
        for label, plan in self._steps():
            try:
                fetch = plan()
                creds = await fetch()
            except CredentialsNotConfigured as exc:
                ses_log.debug("credentials: %s skipped: %s", label, exc)
                skipped.append(f"{label}: {exc}")
                continue
            except CredentialsError as exc:
                raise CredentialsError(f"{label} is configured but failed: {exc}") from None
            ses_log.info("AWS credentials from %s (access key %s)", label, creds.key_shown)
            return fetch, creds
        raise CredentialsError(
            "no AWS credentials found; tried, in order:\n  " + "\n  ".join(skipped)
        )


def default_chain(
    env: Mapping[str, str],
    *,
    session: aiohttp.ClientSession,
    region: str,
    clock: Clock = utcnow,
    sleep: Sleep = asyncio.sleep,
) -> RefreshingProvider:
    """The AWS SDKs' default credential chain (see the package docstring).

    No I/O here: the first ``get()`` finds the source (await it at start-up to
    fail early); later refreshes ask the same source. ``env`` is copied;
    ``session`` is the caller's (its SSL context is used for https endpoints);
    ``region`` picks the regional STS endpoint and signs AssumeRole; ``clock``
    returns aware datetimes; ``sleep`` paces container endpoint retries.
    """
    ctx = Context(dict(env), session, region, clock, sleep)
    return RefreshingProvider(_Chain(ctx).fetch, name="AWS credential chain", clock=clock)
