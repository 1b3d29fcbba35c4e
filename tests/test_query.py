"""SES Query API form bodies, checked against botocore's own query serializer."""

from __future__ import annotations

import base64
import dataclasses
import random
import string
import tracemalloc
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, parse_qsl, quote

import botocore.serialize
import botocore.session
import pytest
from botocore.awsrequest import AWSRequest
from botocore.utils import percent_encode as boto_percent_encode
from botocore.utils import percent_encode_sequence
from hypothesis import given, settings
from hypothesis import strategies as st

import relay.ses.query
from relay.ses.query import (
    FORM_CONTENT_TYPE,
    encode_form,
    get_send_quota_body,
    percent_encode,
    send_raw_email_body,
)
from relay.ses.sender import READ_CHUNK, RawMessage, SendRequest, SesParameters

UNRESERVED = set(string.ascii_letters + string.digits + "-_.~")
BODY_ALPHABET = {ord(c) for c in UNRESERVED | set("%&=")}
HEX_UPPER = set("0123456789ABCDEF")

SES_MODEL = botocore.session.get_session().get_service_model("ses")
SERIALIZER = botocore.serialize.create_serializer("query", include_validation=False)

text = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=16),
    st.text(st.sampled_from("+~*% =&/?#aZ09-_.é€😀\t\r\n"), max_size=16),
    st.sampled_from(["", "+", "~", "*", "%", " ", "a b", "%20", "%2B", "="]),
)
optional_text = st.one_of(st.none(), text)
requests = st.builds(
    SendRequest,
    raw_message=st.binary(max_size=600).map(RawMessage.of),
    destinations=st.lists(text, max_size=6).map(tuple),
    source=optional_text,
    ses=st.builds(
        SesParameters,
        from_arn=optional_text,
        source_arn=optional_text,
        return_path_arn=optional_text,
        configuration_set=optional_text,
        tags=st.lists(st.tuples(text, text), max_size=4).map(tuple),
    ),
)


def botocore_params(request: SendRequest) -> dict[str, Any]:
    """The same call as botocore's ``send_raw_email(**params)``, in the model's member order.

    botocore serializes in the order of the caller's dict, not the model's.
    """
    given_params: dict[str, Any] = {
        "Source": request.source,
        # botocore sends an empty list as "Destinations=" / "Tags="; we leave it out.
        "Destinations": list(request.destinations) or None,
        "RawMessage": {"Data": raw_bytes(request)},
        "FromArn": request.ses.from_arn,
        "SourceArn": request.ses.source_arn,
        "ReturnPathArn": request.ses.return_path_arn,
        "Tags": [{"Name": name, "Value": value} for name, value in request.ses.tags] or None,
        "ConfigurationSetName": request.ses.configuration_set,
    }
    members = SES_MODEL.operation_model("SendRawEmail").input_shape.members
    assert list(members) == list(given_params)
    return {name: value for name, value in given_params.items() if value is not None}


def raw_bytes(request: SendRequest) -> bytes:
    return b"".join(request.raw_message.chunks())


def whole_body(request: SendRequest) -> bytes:
    """The body of ``request``, its chunks joined."""
    return b"".join(send_raw_email_body(request, request.raw_message.chunks()))


def botocore_form(operation: str, params: dict[str, Any]) -> dict[str, str]:
    """botocore's serialized form parameters (an ordered dict, not yet encoded)."""
    serialized = SERIALIZER.serialize_to_request(params, SES_MODEL.operation_model(operation))
    body: dict[str, str] = serialized["body"]
    return body


def assert_form_shape(body: bytes) -> None:
    """Only ``A-Za-z0-9-_.~%&=``; one ``=`` per pair; every ``%`` starts an upper-case escape."""
    assert set(body) <= BODY_ALPHABET
    for pair in body.split(b"&"):
        assert pair.count(b"=") == 1, pair[:80]
    for escape in body.split(b"%")[1:]:
        assert set(escape[:2].decode()) <= HEX_UPPER
        assert len(escape) >= 2


def decoded(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)


# --- percent_encode / encode_form ----------------------------------------------------------


@settings(max_examples=200)
@given(st.one_of(text, st.text(st.characters(codec="utf-8"))))
def test_percent_encode_matches_botocore(value: str) -> None:
    encoded = percent_encode(value)
    assert encoded == boto_percent_encode(value)
    assert encoded == quote(value.encode("utf-8"), safe="-_.~")
    # only unreserved characters bare; everything else as %XX, upper-case hex
    rest = encoded
    while rest:
        if rest[0] == "%":
            assert set(rest[1:3]) <= HEX_UPPER
            assert len(rest[1:3]) == 2
            rest = rest[3:]
        else:
            assert rest[0] in UNRESERVED
            rest = rest[1:]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a b+c~d*e%f/g=h&i", "a%20b%2Bc~d%2Ae%25f%2Fg%3Dh%26i"),
        ("*", "%2A"),
        ("+", "%2B"),
        (" ", "%20"),
        ("~", "~"),
        ("a.b-c_d~", "a.b-c_d~"),
        ("!'()", "%21%27%28%29"),
        ("a@b.c", "a%40b.c"),
    ],
)
def test_percent_encode_examples(value: str, expected: str) -> None:
    assert percent_encode(value) == expected


def test_percent_encode_non_ascii() -> None:
    assert percent_encode("é€") == "%C3%A9%E2%82%AC"
    assert percent_encode("") == ""
    with pytest.raises(UnicodeEncodeError):
        percent_encode("\ud800")


@settings(max_examples=200)
@given(st.lists(st.tuples(text, text), max_size=10))
def test_encode_form_matches_botocore(params: list[tuple[str, str]]) -> None:
    body = encode_form(params)
    assert body == percent_encode_sequence(params).encode("ascii")
    if params:
        assert_form_shape(body)
    assert decoded(body) == params


# --- SendRawEmail ------------------------------------------------------------------------


@settings(max_examples=200)
@given(requests)
def test_send_raw_email_matches_botocore_serializer(request: SendRequest) -> None:
    body = whole_body(request)
    form = botocore_form("SendRawEmail", botocore_params(request))
    # Same parameters, same order, except that ours puts RawMessage.Data last.
    rest = [(name, value) for name, value in form.items() if name != "RawMessage.Data"]
    expected = [*rest, ("RawMessage.Data", form["RawMessage.Data"])]
    assert body == percent_encode_sequence(expected).encode("ascii")
    # And what botocore actually puts on the wire (urlencode: '+' for space) decodes the same.
    wire = AWSRequest(method="POST", url="https://email.us-east-1.amazonaws.com/", data=form)
    wire_body = wire.prepare().body
    assert sorted(decoded(body)) == sorted(parse_qsl(wire_body, keep_blank_values=True))


@settings(max_examples=200)
@given(requests)
def test_send_raw_email_parameters(request: SendRequest) -> None:
    body = whole_body(request)
    assert_form_shape(body)
    assert body.startswith(b"Action=SendRawEmail&Version=2010-12-01&")
    pairs = decoded(body)
    assert pairs[-1][0] == "RawMessage.Data"

    expected: dict[str, str] = {"Action": "SendRawEmail", "Version": "2010-12-01"}
    for name, value in (
        ("Source", request.source),
        ("FromArn", request.ses.from_arn),
        ("SourceArn", request.ses.source_arn),
        ("ReturnPathArn", request.ses.return_path_arn),
        ("ConfigurationSetName", request.ses.configuration_set),
    ):
        if value is not None:
            expected[name] = value
    for i, address in enumerate(request.destinations, 1):
        expected[f"Destinations.member.{i}"] = address
    for i, (name, value) in enumerate(request.ses.tags, 1):
        expected[f"Tags.member.{i}.Name"] = name
        expected[f"Tags.member.{i}.Value"] = value
    raw_data = pairs.pop()[1]
    assert dict(pairs) == expected
    assert len(pairs) == len(expected)  # no name twice
    assert base64.b64decode(raw_data, validate=True) == raw_bytes(request)


@settings(max_examples=200)
@given(st.binary(max_size=4096))
def test_raw_message_round_trip(raw: bytes) -> None:
    body = whole_body(SendRequest(RawMessage.of(raw)))
    assert body.startswith(b"Action=SendRawEmail&Version=2010-12-01&RawMessage.Data=")
    assert_form_shape(body)
    parsed = parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    assert parsed.keys() == {"Action", "Version", "RawMessage.Data"}
    [data] = parsed["RawMessage.Data"]
    assert base64.b64decode(data, validate=True) == raw


def test_raw_message_escapes_plus_slash_equals() -> None:
    body = whole_body(SendRequest(RawMessage.of(b"\xfb\xff\xbf\xfb\xff")))
    assert base64.b64encode(b"\xfb\xff\xbf\xfb\xff") == b"+/+/+/8="
    assert body.endswith(b"&RawMessage.Data=%2B%2F%2B%2F%2B%2F8%3D")


def test_large_message_round_trip_without_per_character_quoting() -> None:
    raw = random.Random(3).randbytes(1_000_000)
    quoted: list[int] = []
    real_quote = quote

    def counting_quote(value: str, safe: str = "/") -> str:
        quoted.append(len(value))
        return real_quote(value, safe=safe)

    request = SendRequest(RawMessage.of(raw), ("a@example.com",), source="b@example.com")
    with mock.patch.object(relay.ses.query, "quote", counting_quote):
        body = whole_body(request)
    assert sum(quoted) < 100  # the message itself never goes through quote()
    [data] = parse_qs(body.decode("ascii"))["RawMessage.Data"]
    assert base64.b64decode(data, validate=True) == raw


CHUNK = READ_CHUNK


@pytest.mark.parametrize("size", [CHUNK - 1, CHUNK, CHUNK + 1, CHUNK + 2, 2 * CHUNK + 1])
def test_message_encoded_in_chunks_is_one_base64_text(size: int) -> None:
    raw = random.Random(size).randbytes(size)
    body = whole_body(SendRequest(RawMessage.of(raw)))
    [data] = parse_qs(body.decode("ascii"), strict_parsing=True)["RawMessage.Data"]
    assert data.encode() == base64.b64encode(raw)  # padding only at the very end


def test_a_large_body_is_made_in_chunks_never_whole() -> None:
    """Issue 15 point 5: measuring and sending a 7 MB message's body holds a
    few chunks, not the 9 MB body (nor the message) a second time."""
    raw = random.Random(7).randbytes(7_000_000)
    request = SendRequest(RawMessage.of(raw), ("a@example.com",))
    tracemalloc.start()
    try:
        size = sum(
            len(chunk) for chunk in send_raw_email_body(request, request.raw_message.chunks())
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 9_000_000
    assert peak < 1_000_000


def test_unset_parameters_are_omitted() -> None:
    body = whole_body(SendRequest(RawMessage.of(b"x")))
    assert body == b"Action=SendRawEmail&Version=2010-12-01&RawMessage.Data=eA%3D%3D"


def test_full_request_example() -> None:
    request = SendRequest(
        raw_message=RawMessage.of(b"Subject: hi\r\n\r\nbody\r\n"),
        destinations=("a+b@example.com", "c d@example.com"),
        source="Ops <ops@example.com>",
        ses=SesParameters(
            from_arn="arn:aws:ses:us-east-1:123456789012:identity/example.com",
            source_arn="arn:aws:ses:us-east-1:123456789012:identity/example.com",
            return_path_arn="arn:aws:ses:us-east-1:123456789012:identity/example.com",
            configuration_set="my-set",
            tags=(("campaign", "spring~sale"),),
        ),
    )
    arn = "arn%3Aaws%3Ases%3Aus-east-1%3A123456789012%3Aidentity%2Fexample.com"
    assert (
        whole_body(request)
        == (
            "Action=SendRawEmail&Version=2010-12-01"
            "&Source=Ops%20%3Cops%40example.com%3E"
            "&Destinations.member.1=a%2Bb%40example.com"
            "&Destinations.member.2=c%20d%40example.com"
            f"&FromArn={arn}&SourceArn={arn}&ReturnPathArn={arn}"
            "&Tags.member.1.Name=campaign&Tags.member.1.Value=spring~sale"
            "&ConfigurationSetName=my-set"
            "&RawMessage.Data=U3ViamVjdDogaGkNCg0KYm9keQ0K"
        ).encode()
    )


def test_request_is_frozen() -> None:
    request = SendRequest(RawMessage.of(b"x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.source = "a@example.com"  # type: ignore[misc]
    assert not hasattr(request, "__dict__")


# --- GetSendQuota ----------------------------------------------------------------------------


def test_get_send_quota_body() -> None:
    body = get_send_quota_body()
    assert body == b"Action=GetSendQuota&Version=2010-12-01"
    assert body == percent_encode_sequence(botocore_form("GetSendQuota", {})).encode("ascii")


def test_form_content_type() -> None:
    assert FORM_CONTENT_TYPE == "application/x-www-form-urlencoded; charset=utf-8"
