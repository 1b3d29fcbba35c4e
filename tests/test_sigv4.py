"""SigV4 signer: byte-for-byte against botocore's SigV4Auth, plus AWS's published examples."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from unittest import mock

import botocore.auth
import botocore.credentials
import pytest
from botocore.awsrequest import AWSRequest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.ses.query import FORM_CONTENT_TYPE, encode_form, send_raw_email_body
from relay.ses.sender import RawMessage, SendRequest
from relay.ses.sigv4 import Credentials, derive_signing_key, payload_hash, sign_request

EXAMPLE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SES_HOST = "email.us-east-1.amazonaws.com"
NOW = datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC)
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def botocore_sign(
    *,
    credentials: Credentials,
    region: str,
    service: str,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    params: Sequence[tuple[str, str]] | None = None,
) -> dict[str, str]:
    """Sign with botocore, its clock frozen at ``now``; return the headers it set.

    botocore (1.43) reads the time through ``botocore.auth.get_current_datetime``
    (naive UTC); patching ``botocore.auth.datetime`` would not freeze it.
    """
    request = AWSRequest(
        method=method, url=url, data=body, headers=dict(headers), params=list(params or [])
    )
    frozen = now.astimezone(UTC).replace(tzinfo=None)
    boto_credentials = botocore.credentials.Credentials(
        credentials.access_key_id, credentials.secret_access_key, credentials.session_token
    )
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=frozen):
        botocore.auth.SigV4Auth(boto_credentials, service, region).add_auth(request)
    names = ("X-Amz-Date", "X-Amz-Security-Token", "Authorization")
    return {name: request.headers[name] for name in names if name in request.headers}


def ours(
    *,
    credentials: Credentials,
    host: str = SES_HOST,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    now: datetime = NOW,
    region: str = "us-east-1",
    service: str = "ses",
    method: str = "POST",
    path: str = "/",
    query: str = "",
) -> dict[str, str]:
    return sign_request(
        credentials=credentials,
        region=region,
        service=service,
        method=method,
        host=host,
        path=path,
        query=query,
        headers={"Content-Type": FORM_CONTENT_TYPE} if headers is None else headers,
        payload_sha256=payload_hash(body),
        now=now,
    )


def signed_headers(added: Mapping[str, str]) -> list[str]:
    auth = added["Authorization"]
    return auth.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";")


CREDS = Credentials("AKIDEXAMPLE", EXAMPLE_SECRET)
TEMP_CREDS = Credentials("ASIAEXAMPLE", EXAMPLE_SECRET, "FQoGZXIvYXdzEXAMPLE//token+/=")


# --- strategies ------------------------------------------------------------------------------

ascii_printable = "".join(chr(c) for c in range(0x20, 0x7F))
param_text = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.text(st.sampled_from("+~*% =&/?#aZ09-_.é€😀\t\n"), max_size=12),
    st.sampled_from(["", "+", "~", "*", "%", " ", "a b", "%20", "%2B", "=", "&"]),
)
params_strategy = st.lists(st.tuples(param_text, param_text), max_size=8)
scope_part = st.from_regex(r"[A-Za-z0-9._-]{1,16}", fullmatch=True)
header_name = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}", fullmatch=True).filter(
    lambda n: (
        n.lower()
        not in {
            "host",
            "authorization",
            "x-amz-date",
            "x-amz-security-token",
            "x-amz-content-sha256",  # botocore takes the payload hash from it
            "date",  # botocore then signs Date instead of X-Amz-Date
            "content-length",  # botocore signs it; we never do (tested apart)
        }
    )
)
header_value = st.one_of(
    st.text(st.sampled_from(ascii_printable + "\t"), max_size=24),
    st.sampled_from(["", " ", "  a   b  ", "\ta\t\tb\t", FORM_CONTENT_TYPE]),
)
extra_headers = st.lists(
    st.tuples(header_name, header_value), max_size=5, unique_by=lambda t: t[0].lower()
)
hop_by_hop = st.lists(
    st.tuples(
        st.sampled_from(["Connection", "User-Agent", "Expect", "keep-alive", "TE", "Upgrade"]),
        header_value,
    ),
    max_size=3,
    unique_by=lambda t: t[0].lower(),
)
hostname = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True),
    st.sampled_from([SES_HOST, "127.0.0.1", "localhost", "[::1]", "[2001:db8::5]"]),
)
port = st.one_of(st.none(), st.integers(1, 65535), st.sampled_from([80, 443, 8080, 4566]))
path_strategy = st.one_of(
    st.just("/"),
    st.from_regex(
        r"(/([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-F]{2}|\.\.?){0,6}){1,4}/?", fullmatch=True
    ),
)
credentials_strategy = st.builds(
    Credentials,
    access_key_id=st.from_regex(r"[A-Z0-9]{1,24}", fullmatch=True),
    secret_access_key=st.text(st.characters(codec="utf-8"), max_size=48),
    session_token=st.one_of(st.none(), st.from_regex(r"[!-~]{1,80}", fullmatch=True)),
)
now_strategy = st.datetimes(
    min_value=datetime(2000, 1, 2),
    max_value=datetime(2999, 12, 30),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    ),
)


# --- against botocore ---------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    credentials=credentials_strategy,
    region=scope_part,
    service=scope_part,
    method=st.sampled_from(["POST", "GET", "post"]),
    scheme=st.sampled_from(["https", "http"]),
    host=hostname,
    port=port,
    path=path_strategy,
    query_params=params_strategy,
    query_as_params=st.booleans(),
    body_params=params_strategy,
    extra=extra_headers,
    unsigned=hop_by_hop,
    now=now_strategy,
    data=st.data(),
)
def test_matches_botocore(
    credentials: Credentials,
    region: str,
    service: str,
    method: str,
    scheme: str,
    host: str,
    port: int | None,
    path: str,
    query_params: list[tuple[str, str]],
    query_as_params: bool,
    body_params: list[tuple[str, str]],
    extra: list[tuple[str, str]],
    unsigned: list[tuple[str, str]],
    now: datetime,
    data: st.DataObject,
) -> None:
    default_port = {"http": 80, "https": 443}[scheme]
    host_header = host if port in (None, default_port) else f"{host}:{port}"
    authority = host if port is None else f"{host}:{port}"
    body = encode_form(body_params)
    headers = dict(extra) | dict(unsigned)
    if query_as_params:
        # botocore canonicalises request.params itself; we get the encoded query in any order.
        query = encode_form(data.draw(st.permutations(query_params))).decode()
        url = f"{scheme}://{authority}{path}"
        boto_params = query_params
    else:
        query = encode_form(query_params).decode()
        url = f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")
        boto_params = []
    expected = botocore_sign(
        credentials=credentials,
        region=region,
        service=service,
        method=method,
        url=url,
        headers=headers,
        body=body,
        now=now,
        params=boto_params,
    )
    got = ours(
        credentials=credentials,
        host=host_header,
        headers=headers,
        body=body,
        now=now,
        region=region,
        service=service,
        method=method,
        path=path,
        query=query,
    )
    assert got == expected
    assert list(got) == [
        "X-Amz-Date",
        *(["X-Amz-Security-Token"] if credentials.session_token else []),
        "Authorization",
    ]


def test_ses_request_matches_botocore() -> None:
    """The exact shape the client sends: service ``ses``, host ``email.<region>...``."""
    request = SendRequest(
        RawMessage.of(b"Subject: hi\r\n\r\nbody\r\n"), ("a@example.com",), source="b@example.com"
    )
    body = b"".join(send_raw_email_body(request, request.raw_message.chunks()))
    for credentials in (CREDS, TEMP_CREDS):
        expected = botocore_sign(
            credentials=credentials,
            region="eu-west-1",
            service="ses",
            method="POST",
            url="https://email.eu-west-1.amazonaws.com/",
            headers={"Content-Type": FORM_CONTENT_TYPE},
            body=body,
            now=NOW,
        )
        got = ours(
            credentials=credentials,
            host="email.eu-west-1.amazonaws.com",
            body=body,
            region="eu-west-1",
        )
        assert got == expected
        assert "/20240229/eu-west-1/ses/aws4_request, " in got["Authorization"]


def test_ten_megabyte_body() -> None:
    raw = random.Random(7).randbytes(7_864_320)
    request = SendRequest(RawMessage.of(raw), ("to@example.com",), source="f@example.com")
    body = b"".join(send_raw_email_body(request, request.raw_message.chunks()))
    assert len(body) > 10_000_000
    chunked = hashlib.sha256()
    for start in range(0, len(body), 1 << 20):
        chunked.update(body[start : start + (1 << 20)])
    assert chunked.hexdigest() == payload_hash(body)
    expected = botocore_sign(
        credentials=TEMP_CREDS,
        region="us-east-1",
        service="ses",
        method="POST",
        url=f"https://{SES_HOST}/",
        headers={"Content-Type": FORM_CONTENT_TYPE},
        body=body,
        now=NOW,
    )
    got = sign_request(
        credentials=TEMP_CREDS,
        region="us-east-1",
        service="ses",
        method="POST",
        host=SES_HOST,
        path="/",
        headers={"Content-Type": FORM_CONTENT_TYPE},
        payload_sha256=chunked.hexdigest(),
        now=NOW,
    )
    assert got == expected


def test_oracle_clock_is_frozen() -> None:
    got = botocore_sign(
        credentials=CREDS,
        region="us-east-1",
        service="ses",
        method="POST",
        url=f"https://{SES_HOST}/",
        headers={},
        body=b"",
        now=datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC),
    )
    assert got["X-Amz-Date"] == "20010203T040506Z"


# --- published AWS examples ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("datestamp", "service", "expected"),
    [
        # "Deriving the signing key" examples, AWS General Reference.
        ("20120215", "iam", "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"),
        ("20150830", "iam", "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"),
    ],
)
def test_signing_key_examples(datestamp: str, service: str, expected: str) -> None:
    assert derive_signing_key(EXAMPLE_SECRET, datestamp, "us-east-1", service).hex() == expected


def test_aws_suite_get_vanilla() -> None:
    """``get-vanilla`` from the AWS SigV4 test suite."""
    got = sign_request(
        credentials=CREDS,
        region="us-east-1",
        service="service",
        method="GET",
        host="example.amazonaws.com",
        path="/",
        headers={},
        payload_sha256=EMPTY_SHA256,
        now=datetime(2015, 8, 30, 12, 36, tzinfo=UTC),
    )
    assert got == {
        "X-Amz-Date": "20150830T123600Z",
        "Authorization": "AWS4-HMAC-SHA256 "
        "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    }


def test_aws_docs_iam_list_users() -> None:
    """The IAM ``ListUsers`` example of the SigV4 documentation."""
    got = sign_request(
        credentials=CREDS,
        region="us-east-1",
        service="iam",
        method="GET",
        host="iam.amazonaws.com",
        path="/",
        query="Version=2010-05-08&Action=ListUsers",  # order does not matter
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        payload_sha256=EMPTY_SHA256,
        now=datetime(2015, 8, 30, 12, 36, tzinfo=UTC),
    )
    assert got["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
    )


# --- behaviour -------------------------------------------------------------------------------


def test_session_token_is_added_and_signed() -> None:
    got = ours(credentials=TEMP_CREDS)
    assert got["X-Amz-Security-Token"] == TEMP_CREDS.session_token
    assert signed_headers(got) == ["content-type", "host", "x-amz-date", "x-amz-security-token"]
    plain = ours(credentials=CREDS)
    assert "X-Amz-Security-Token" not in plain
    assert signed_headers(plain) == ["content-type", "host", "x-amz-date"]
    empty = ours(credentials=Credentials("AKIDEXAMPLE", EXAMPLE_SECRET, ""))
    assert empty == plain


@pytest.mark.parametrize(
    "name", ["Connection", "User-Agent", "Content-Length", "Expect", "Transfer-Encoding"]
)
def test_unsigned_headers(name: str) -> None:
    base = ours(credentials=CREDS)
    got = ours(credentials=CREDS, headers={"Content-Type": FORM_CONTENT_TYPE, name: "12"})
    assert signed_headers(got) == ["content-type", "host", "x-amz-date"]
    assert got == base


def test_header_values_trimmed_and_names_case_folded() -> None:
    base = ours(credentials=CREDS, headers={"x-custom": "a b c"})
    assert ours(credentials=CREDS, headers={"X-Custom": "  a \t b   c \t"}) == base
    assert ours(credentials=CREDS, headers={"X-Custom": "a  b"}) != base
    assert signed_headers(base) == ["host", "x-amz-date", "x-custom"]


def test_host_port_is_signed_as_given() -> None:
    with_port = ours(credentials=CREDS, host="127.0.0.1:4566")
    assert with_port != ours(credentials=CREDS, host="127.0.0.1")
    assert with_port == botocore_sign(
        credentials=CREDS,
        region="us-east-1",
        service="ses",
        method="POST",
        url="http://127.0.0.1:4566/",
        headers={"Content-Type": FORM_CONTENT_TYPE},
        body=b"",
        now=NOW,
    )


def test_query_canonicalisation() -> None:
    base = ours(credentials=CREDS, query="a=1&b=%7E%20x&c=")
    assert ours(credentials=CREDS, query="c=&b=~%20x&a=1") == base
    assert ours(credentials=CREDS, query="c&b=%7e%20x&a=1") == base
    assert ours(credentials=CREDS, query="a=1&b=~x&c=") != base
    assert ours(credentials=CREDS, query="a=%2B") != ours(credentials=CREDS, query="a=%20")


def test_time_zones() -> None:
    local = NOW.astimezone(timezone(timedelta(hours=-5)))
    assert ours(credentials=CREDS, now=local) == ours(credentials=CREDS, now=NOW)
    assert ours(credentials=CREDS, now=NOW + timedelta(microseconds=999_999)) == ours(
        credentials=CREDS, now=NOW
    )
    assert ours(credentials=CREDS, now=NOW)["X-Amz-Date"] == "20240229T235959Z"


def test_signing_key_is_cached() -> None:
    derive_signing_key.cache_clear()
    ours(credentials=CREDS)
    ours(credentials=CREDS, body=b"other")
    info = derive_signing_key.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    assert info.maxsize is not None
    assert info.maxsize <= 64


def test_secret_changes_signature() -> None:
    other = Credentials("AKIDEXAMPLE", EXAMPLE_SECRET + "x")
    assert ours(credentials=other)["Authorization"] != ours(credentials=CREDS)["Authorization"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"now": datetime(2024, 1, 1)},  # naive
        {"headers": {"Host": SES_HOST}},
        {"headers": {"Authorization": "x"}},
        {"headers": {"X-Amz-Date": "20240101T000000Z"}},
        {"headers": {"X-Amz-Security-Token": "t"}},
        {"headers": {"Content-Type": "a", "content-type": "b"}},
        {"headers": {"X-Bad": "line\r\nInjected: 1"}},
        {"headers": {"X-Bad": "caf\u00e9"}},
        {"headers": {"Bad Name": "x"}},
        {"host": ""},
        {"host": "a b"},
        {"region": ""},
        {"region": "us-east-1/x"},
        {"service": "s es"},
        {"method": "PO ST"},
        {"path": ""},
        {"path": "relative"},
        {"path": "/a?b=c"},
        {"query": "a=b+c"},
        {"query": "a=%zz"},
        {"payload_sha256": EMPTY_SHA256.upper()},
        {"payload_sha256": hashlib.sha256(b"").digest().hex()[:63]},
        {"credentials": Credentials("AKID/EXAMPLE", "s")},
        {"credentials": Credentials("AKID", "s", "tok\nen")},
    ],
)
def test_rejects_malformed_input(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "credentials": CREDS,
        "region": "us-east-1",
        "service": "ses",
        "method": "POST",
        "host": SES_HOST,
        "path": "/",
        "query": "",
        "headers": {},
        "payload_sha256": EMPTY_SHA256,
        "now": NOW,
    }
    args |= kwargs
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        sign_request(**args)  # type: ignore[arg-type]
