"""AWS credentials: providers and the SDKs' default chain.

``default_chain(env, session=..., region=...)`` looks for credentials where the
AWS SDKs do, in botocore's order:

1. environment: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY``
   (+ ``AWS_SECURITY_TOKEN`` / ``AWS_SESSION_TOKEN``, ``AWS_CREDENTIAL_EXPIRATION``);
2. the selected profile's ``role_arn`` (with ``source_profile`` or
   ``credential_source``): STS ``AssumeRole``, signed with the source's credentials;
3. web identity: ``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN`` (or the
   profile's ``web_identity_token_file`` + ``role_arn``): STS
   ``AssumeRoleWithWebIdentity``, unsigned;
4. static keys of the profile in the shared credentials file (``~/.aws/credentials``);
5. static keys of the profile in the shared config file (``~/.aws/config``);
6. container credentials (``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` / ``_FULL_URI``);
7. EC2 instance metadata (IMDSv2, IMDSv1 only as botocore's fallback).

A source that is not configured is skipped; a configured source that fails
raises. Finding nothing raises ``CredentialsError`` listing every source and
why it was skipped. Profiles that use SSO, ``login_session`` or
``credential_process`` are refused with a clear "not supported" error rather
than silently skipped.

Parsing (environment, INI files, STS XML, container and IMDS JSON, endpoint
rules) is done by plain functions; I/O lives in the fetch closures. No secret
(secret key, session token, web identity token, container authorization token)
ever appears in a message, a repr or a log line.

``RefreshingProvider`` caches temporary credentials: ``get()`` does no I/O
while more than 15 minutes remain; inside that advisory window it starts one
background refresh; inside the 10-minute mandatory window, once expired, or
after ``invalidate()``, callers await one shared refresh.
"""

from __future__ import annotations

from relay.ses.credentials.chain import default_chain
from relay.ses.credentials.fetch import MAX_RESPONSE_SIZE
from relay.ses.credentials.files import SharedFiles, load_shared_files
from relay.ses.credentials.parsing import (
    container_endpoint,
    credentials_from_env,
    credentials_from_profile,
    imds_endpoint,
    parse_container_credentials,
    parse_expiration,
    parse_imds_credentials,
    parse_profiles,
    parse_sts_credentials,
    select_profile,
    sts_endpoint,
)
from relay.ses.credentials.providers import (
    ADVISORY_REFRESH,
    MANDATORY_REFRESH,
    CredentialProvider,
    RefreshingProvider,
    StaticProvider,
)

__all__ = [
    "ADVISORY_REFRESH",
    "MANDATORY_REFRESH",
    "MAX_RESPONSE_SIZE",
    "CredentialProvider",
    "RefreshingProvider",
    "SharedFiles",
    "StaticProvider",
    "container_endpoint",
    "credentials_from_env",
    "credentials_from_profile",
    "default_chain",
    "imds_endpoint",
    "load_shared_files",
    "parse_container_credentials",
    "parse_expiration",
    "parse_imds_credentials",
    "parse_profiles",
    "parse_sts_credentials",
    "select_profile",
    "sts_endpoint",
]
