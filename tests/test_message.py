"""Message preparation and batching: pure, no sockets."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from relay.errors import MessageRefused
from relay.message import (
    INLINE_HEADER_LIMIT,
    HeaderSplitter,
    cheap_to_prepare,
    plan_batches,
    prepare,
    prepare_header,
    split_header,
)
from relay.ses.sender import NO_PARAMETERS, SesParameters

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def prep(raw: bytes, defaults: SesParameters = NO_PARAMETERS):  # type: ignore[no-untyped-def]
    return prepare(raw, now=NOW, message_id=lambda: "<id-1@relay.test>", defaults=defaults)


COMPLETE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Date: Mon, 23 Nov 2026 11:00:00 +0000\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Body line\r\n.. dot\r\n"
)


def test_complete_message_is_unchanged() -> None:
    prepared = prep(COMPLETE)
    assert prepared.raw is COMPLETE  # not even copied: a 10 MB message stays one object
    assert prepared.from_address == "alice@example.com"
    assert prepared.header_count == 1
    assert prepared.ses == SesParameters()


header_name = st.from_regex(r"X-[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True)
header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
).map(str.strip)
body = st.binary(max_size=500).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(header_name, header_value), max_size=6), body)
def test_other_headers_and_body_pass_byte_for_byte(
    extra: list[tuple[str, str]], body_bytes: bytes
) -> None:
    fields = b"".join(f"{n}: {v}\r\n".encode() for n, v in extra)
    raw = COMPLETE.split(b"\r\n\r\n")[0] + b"\r\n" + fields + b"\r\n" + body_bytes
    assume(all(not n.lower().startswith("x-ses-") for n, _ in extra))
    assert prep(raw).raw == raw
    without_date = raw.replace(b"Date: Mon, 23 Nov 2026 11:00:00 +0000\r\n", b"")
    assert prep(without_date).raw == without_date.replace(
        b"\r\n\r\n", b"\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\n\r\n", 1
    )


def test_bcc_and_resent_bcc_are_removed_with_their_folded_lines() -> None:
    raw = (
        b"From: a@example.com\r\nBcc: hidden@example.com,\r\n  other@example.com\r\n"
        b"To: t@example.com\r\nresent-bcc: r@example.com\r\nDate: x\r\nMessage-ID: <y>\r\n"
        b"\r\nbody mentions Bcc: in the body\r\n"
    )
    prepared = prep(raw)
    assert prepared.raw == (
        b"From: a@example.com\r\nTo: t@example.com\r\nDate: x\r\nMessage-ID: <y>\r\n"
        b"\r\nbody mentions Bcc: in the body\r\n"
    )


def test_ses_headers_become_parameters_and_are_removed() -> None:
    raw = (
        b"From: a@example.com\r\nDate: x\r\nMessage-ID: <y>\r\n"
        b"X-SES-CONFIGURATION-SET: marketing\r\n"
        b"X-SES-MESSAGE-TAGS: campaign=fall, team = ops\r\n"
        b"x-ses-source-arn: arn:aws:ses:us-east-1:1:identity/example.com\r\n"
        b"X-SES-FROM-ARN: arn:aws:ses:us-east-1:1:identity/from.example.com\r\n"
        b"X-SES-RETURN-PATH-ARN: arn:aws:ses:us-east-1:1:identity/rp.example.com\r\n"
        b"\r\nbody\r\n"
    )
    prepared = prep(raw)
    assert prepared.raw == b"From: a@example.com\r\nDate: x\r\nMessage-ID: <y>\r\n\r\nbody\r\n"
    assert prepared.ses == SesParameters(
        configuration_set="marketing",
        tags=(("campaign", "fall"), ("team", "ops")),
        source_arn="arn:aws:ses:us-east-1:1:identity/example.com",
        from_arn="arn:aws:ses:us-east-1:1:identity/from.example.com",
        return_path_arn="arn:aws:ses:us-east-1:1:identity/rp.example.com",
    )
    assert prepared.identity_headers() == [
        "X-SES-SOURCE-ARN",
        "X-SES-FROM-ARN",
        "X-SES-RETURN-PATH-ARN",
    ]


def test_config_defaults_apply_unless_a_header_overrides() -> None:
    defaults = SesParameters(configuration_set="default-set", tags=(("env", "prod"),))
    assert prep(COMPLETE, defaults).ses == defaults
    raw = COMPLETE.replace(b"Subject", b"X-SES-CONFIGURATION-SET: other\r\nSubject")
    assert prep(raw, defaults).ses.configuration_set == "other"


def test_bad_tags_are_refused() -> None:
    raw = COMPLETE.replace(b"Subject", b"X-SES-MESSAGE-TAGS: novalue\r\nSubject")
    with pytest.raises(MessageRefused) as caught:
        prep(raw)
    assert str(caught.value.reply).startswith("550 5.6.0 X-SES-MESSAGE-TAGS")


def test_missing_date_and_message_id_are_added_at_the_end_of_the_header() -> None:
    raw = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"
    assert prep(raw).raw == (
        b"From: a@example.com\r\nSubject: s\r\n"
        b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <id-1@relay.test>\r\n"
        b"\r\nbody\r\n"
    )


def test_header_only_message_gets_a_separator() -> None:
    raw = b"From: a@example.com\r\nDate: d\r\nMessage-ID: <m>"
    assert prep(raw).raw == b"From: a@example.com\r\nDate: d\r\nMessage-ID: <m>\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"To: b@example.com\r\n\r\nbody\r\n",
        b"From: undisclosed:;\r\n\r\nbody\r\n",
        b"From: no address here\r\n\r\n",
        b"",
    ],
)
def test_message_without_from_address_is_refused(raw: bytes) -> None:
    with pytest.raises(MessageRefused) as caught:
        prep(raw)
    assert caught.value.reply.code == 550
    assert caught.value.reply.enhanced == "5.6.0"
    assert "From:" in caught.value.reply.text


def test_header_count_comes_from_to_and_cc_only_repeats_counted() -> None:
    raw = (
        b"From: a@example.com\r\nTo: One <ONE@example.com>, list: two@example.com;\r\n"
        b"Cc: three@example.com, one@example.com\r\nReply-To: four@example.com\r\n\r\n"
    )
    assert prep(raw).header_count == 4


def test_split_header_stops_at_a_non_header_line() -> None:
    fields, rest = split_header(b"From: a\r\nnot a header\r\nX: y\r\n")
    assert [f.name for f in fields] == ["From"]
    assert rest == b"not a header\r\nX: y\r\n"


def addrs(n: int, domain: str = "example.com") -> list[str]:
    return [f"user{i}@{domain}" for i in range(n)]


def test_batches_of_fifty_when_headers_name_no_outsider() -> None:
    assert [len(b) for b in plan_batches(addrs(120), 0)] == [50, 50, 20]


def test_one_header_address_outside_the_batches_takes_a_seat_in_each() -> None:
    assert [len(b) for b in plan_batches(addrs(120), 1)] == [49, 49, 22]


@pytest.mark.parametrize(
    ("to_cc", "sizes"),
    [
        # moto counts Destinations plus every To/Cc occurrence: a header
        # address that is also a recipient takes a seat in every batch.
        ("To: user0@example.com\r\nCc: user1@example.com\r\n", [48, 48, 24]),
        ("To: user0@example.com, USER0@example.com\r\n", [48, 48, 24]),
        ("To: user0@example.com\r\nCc: team@example.org\r\n", [48, 48, 24]),
        ("To: undisclosed-recipients:;\r\n", [50, 50, 20]),
    ],
)
def test_every_to_cc_occurrence_takes_a_seat_in_every_batch(to_cc: str, sizes: list[int]) -> None:
    prepared = prep(f"From: a@example.com\r\n{to_cc}Subject: x\r\n\r\nbody\r\n".encode())
    batches = plan_batches(addrs(120), prepared.header_count)
    assert [len(b) for b in batches] == sizes
    assert all(len(b) + prepared.header_count <= 50 for b in batches)


def test_duplicates_are_sent_once_and_order_is_kept() -> None:
    recipients = ["b@x.com", "a@x.com", "B@x.com", "c@x.com", "a@x.com"]
    assert plan_batches(recipients, 0) == [("b@x.com", "a@x.com", "c@x.com")]


@pytest.mark.parametrize("header_count", [50, 51])
def test_headers_leaving_no_room_are_refused_with_advice(header_count: int) -> None:
    with pytest.raises(MessageRefused) as caught:
        plan_batches(["x@example.org"], header_count)
    reply = caught.value.reply
    assert (reply.code, reply.enhanced) == (550, "5.5.3")
    assert "Bcc" in reply.text
    assert "undisclosed-recipients" in reply.text


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 200), max_size=300),
    st.lists(st.integers(0, 250), max_size=45),
    st.integers(1, 50),
)
def test_batches_respect_the_limit_and_lose_nothing(
    picks: list[int], header_picks: list[int], limit: int
) -> None:
    recipients = [f"r{i}@example.com" for i in picks]
    header = [f"r{i}@example.com" for i in header_picks]
    try:
        batches = plan_batches(recipients, len(header), limit)
    except MessageRefused:
        assert len(header) >= limit
        return
    flat = [r for batch in batches for r in batch]
    assert flat == list(dict.fromkeys(recipients))
    for batch in batches:
        assert batch
        assert len(set(batch) | set(header)) <= limit  # counted as a union
        assert len(batch) + len(header) <= limit  # counted as moto counts
    # As few calls as the sum count allows.
    assert len(batches) == -(-len(set(recipients)) // (limit - len(header)))


# -- who sends: From: and Sender: (issue 12, point 5) --------------------------


def refusal(raw: bytes, **kwargs: int) -> str:
    with pytest.raises(MessageRefused) as caught:
        prepare(raw, now=NOW, message_id=lambda: "<id-1@relay.test>", **kwargs)
    return str(caught.value.reply)


def test_every_mailbox_of_from_and_sender_is_an_originator() -> None:
    raw = (
        b"From: Alice <alice@allowed.example>, eve@evil.example\r\n"
        b"Sender: bob@allowed.example\r\nDate: d\r\nMessage-ID: <m>\r\n\r\n"
    )
    prepared = prep(raw)
    assert prepared.from_address == "alice@allowed.example"
    assert prepared.originators == (
        ("From:", "alice@allowed.example"),
        ("From:", "eve@evil.example"),
        ("Sender:", "bob@allowed.example"),
    )


def test_field_name_with_space_before_the_colon_is_a_field() -> None:
    """RFC 5322 obs-optional: ``From :`` is a From: field, not the end of the header."""
    fields, rest = split_header(b"From : eve@evil.example\r\nX-Other\t: y\r\n\r\nbody")
    assert [f.name for f in fields] == ["From", "X-Other"]
    assert rest == b"\r\nbody"
    assert prep(b"From : eve@evil.example\r\n\r\n").from_address == "eve@evil.example"


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (
            b"From: alice@allowed.example\r\nFrom: eve@evil.example\r\n\r\n",
            "550 5.6.0 message has 2 From: header fields; one is allowed",
        ),
        (
            b"From: alice@allowed.example\r\nfrom : eve@evil.example\r\n\r\n",
            "550 5.6.0 message has 2 From: header fields; one is allowed",
        ),
        (
            b"From: a@allowed.example\r\nSender: a@allowed.example\r\n"
            b"SENDER: e@evil.example\r\n\r\n",
            "550 5.6.0 message has 2 Sender: header fields; one is allowed",
        ),
        (
            b"From: a@allowed.example\r\nSender: a@allowed.example, e@evil.example\r\n\r\n",
            "550 5.6.0 Sender: header must hold exactly one mailbox",
        ),
        (
            b"From: allowed: eve@evil.example;\r\n\r\n",
            "550 5.6.0 From: header is not a valid mailbox list: "
            "a group is not allowed here, only mailboxes",
        ),
        (
            b"From: alice@allowed.example<eve@evil.example>\r\n\r\n",
            "550 5.6.0 From: header is not a valid mailbox list: "
            "unexpected '<' after an address: missing ','?",
        ),
        (
            b"From: ((((((((((((a)))))))))))) alice@allowed.example\r\n\r\n",
            "550 5.6.0 From: header is not a valid mailbox list: comments nested more than 8 deep",
        ),
        (
            b"From: a@allowed.example\r\nTo: Smith, John <j@x.example>\r\n\r\n",
            "550 5.6.0 To: header is not a valid address list: a name without an address in <>",
        ),
        (
            b"From: a@allowed.example\r\ncc: a@x.example\r\n  b@y.example\r\n\r\n",
            "550 5.6.0 Cc: header is not a valid address list: "
            "space or a comment inside the domain",
        ),
    ],
)
def test_sender_fields_that_do_not_read_one_way_are_refused(raw: bytes, reply: str) -> None:
    assert refusal(raw) == reply


def test_a_line_that_is_no_field_ends_the_header_for_every_reader() -> None:
    """The relay stops reading the header at such a line; so that no reader
    takes a later From: as a header field, the empty line is put there."""
    raw = b"From: alice@allowed.example\r\nnot a field\r\nFrom: eve@evil.example\r\n\r\nbody\r\n"
    prepared = prep(raw)
    assert prepared.originators == (("From:", "alice@allowed.example"),)
    assert prepared.raw == (
        b"From: alice@allowed.example\r\n"
        b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <id-1@relay.test>\r\n"
        b"\r\nnot a field\r\nFrom: eve@evil.example\r\n\r\nbody\r\n"
    )


# -- cost: linear, and the header block bounded (issue 12, point 2) ------------


def test_header_block_over_the_limit_is_refused_and_at_the_limit_taken() -> None:
    head = b"From: a@example.com\r\nDate: d\r\nMessage-ID: <m>\r\nSubject: x\r\n"
    at_limit = head + b" y\r\n" * 100
    raw = at_limit + b"\r\nbody\r\n"
    assert prep(raw).raw == raw
    assert (
        prepare(raw, now=NOW, message_id=lambda: "<m>", header_size_limit=len(at_limit)).raw == raw
    )
    assert refusal(raw, header_size_limit=len(at_limit) - 1) == (
        f"552 5.3.4 message header exceeds {len(at_limit) - 1} bytes"
    )


def prepare_seconds(raw: bytes) -> float:
    started = time.process_time()
    prep(raw)
    return time.process_time() - started


@pytest.mark.parametrize(
    ("field", "unit"),
    [
        (b"Subject: folded", b"\r\n y"),  # folded lines were joined by copying
        (b"To: list:", b"\r\n Name <n@example.com>,"),  # a long address list
        (b"X-Many: y", b"\r\nX-Many: y"),  # many fields
    ],
)
def test_preparing_costs_time_linear_in_the_header_size(field: bytes, unit: bytes) -> None:
    """Four times the header takes about four times as long, not sixteen."""
    n = 100_000 // len(unit)  # 100 KB, then 400 KB

    def message(count: int) -> bytes:
        return b"From: a@example.com\r\n" + field + unit * count + b";\r\n\r\nbody\r\n"

    small = min(prepare_seconds(message(n)) for _ in range(3))
    large = min(prepare_seconds(message(4 * n)) for _ in range(3))
    assert large < 8 * small


def test_cheap_to_prepare_bounds_the_header_block() -> None:
    """Issue 15: only the header block is prepared (the body streams past it),
    so only its size decides; a large body no longer matters."""
    header = b"X-Pad: " + b"p" * 60 + b"\r\n"
    near = header * ((INLINE_HEADER_LIMIT - 200) // len(header))
    far = header * (INLINE_HEADER_LIMIT // len(header) + 1)
    assert cheap_to_prepare(near)
    assert cheap_to_prepare(b"x" * INLINE_HEADER_LIMIT)
    assert not cheap_to_prepare(b"x" * (INLINE_HEADER_LIMIT + 1))
    assert not cheap_to_prepare(far)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Newsletter; topic=Sports", ("Newsletter", "Sports")),
        ("  Newsletter ;TOPIC = Sports ; other=1", ("Newsletter", "Sports")),
        ("Newsletter", ("Newsletter", None)),
        ("Newsletter; topic=", ("Newsletter", None)),
        ("; topic=Sports", (None, None)),
    ],
)
def test_list_management_options_are_read_and_the_header_kept(
    value: str, expected: tuple[str | None, str | None]
) -> None:
    raw = (
        f"From: a@example.com\r\nDate: x\r\nMessage-ID: <y>\r\n"
        f"X-SES-LIST-MANAGEMENT-OPTIONS: {value}\r\n\r\nbody\r\n"
    ).encode()
    prepared = prep(raw)
    assert prepared.raw == raw  # v1 has no parameter for it: SES reads the header
    assert (prepared.ses.contact_list, prepared.ses.topic) == expected


# -- the header block of a message arriving in pieces (issue 15, point 5) -------


T = TypeVar("T")


def outcome(make: Callable[[], T]) -> T | str:
    """What ``make()`` returns, or the reply of the ``MessageRefused`` it raises."""
    try:
        return make()
    except MessageRefused as refused:
        return str(refused.reply)


def streamed(raw: bytes, cuts: list[int], limit: int | None = None) -> tuple[bytes, bytes]:
    """``raw`` through a ``HeaderSplitter`` in pieces cut at ``cuts``: the
    header block, and what came back of the rest (the first part once split)."""
    splitter = HeaderSplitter(limit)
    rest = b""
    bounds = [0, *sorted(c % (len(raw) + 1) for c in cuts), len(raw)]
    for start, end in itertools.pairwise(bounds):
        rest += splitter.feed(raw[start:end])
    rest += splitter.feed(b"", final=True)
    return splitter.header, rest


lines = st.lists(
    st.one_of(
        st.sampled_from([b"From: a@example.com", b"To: b@example.net", b" folded", b"\tmore"]),
        st.sampled_from([b"", b"not a field", b"X-Y : z", b"Subject:x", b":", b"a b: c"]),
        st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(lines, st.lists(st.integers(min_value=0), max_size=8), st.booleans())
def test_the_header_block_ends_where_it_would_in_the_whole_message(
    parts: list[bytes], cuts: list[int], trailing: bool
) -> None:
    """Cut anywhere, a message splits as it does whole: same header block,
    same rest; and prepared from its header alone it is the same message."""
    raw = b"\r\n".join(parts) + (b"\r\n" if trailing else b"")
    whole_fields, whole_rest = split_header(raw)
    header, rest = streamed(raw, cuts)
    assert header + rest == raw
    assert rest == whole_rest
    assert [f.raw for f in whole_fields] == [f.raw for f in split_header(header)[0]]
    expected = outcome(lambda: prepare(raw, now=NOW, message_id=lambda: "<m>").raw)
    alone = outcome(lambda: prepare_header(header, rest, now=NOW, message_id=lambda: "<m>").raw)
    assert (alone + rest if isinstance(alone, bytes) else alone) == expected


@settings(max_examples=300, deadline=None)
@given(lines, st.lists(st.integers(min_value=0), max_size=8), st.integers(1, 120))
def test_the_header_limit_decides_alike_whatever_the_pieces(
    parts: list[bytes], cuts: list[int], limit: int
) -> None:
    raw = b"\r\n".join(parts) + b"\r\n\r\nbody\r\n"
    whole = outcome(lambda: streamed(raw, [], limit))
    assert outcome(lambda: streamed(raw, cuts, limit)) == whole
    assert isinstance(whole, str) or len(whole[0]) <= limit


def test_a_long_line_after_the_header_is_decided_within_the_limit() -> None:
    """The line after the header block must show within the limit (and one
    byte more) that it is no field; then only that much of it is held."""
    head = b"From: a@example.com\r\n"
    splitter = HeaderSplitter(100)
    assert splitter.feed(head) == b""
    assert splitter.feed(b"just text" + b"x" * 50) == b""  # not decided: could still be short
    assert splitter.feed(b"x" * 50) == b"just text" + b"x" * 100
    assert splitter.header == head
    assert splitter.feed(b"later") == b"later"
    undecided = HeaderSplitter(100)
    undecided.feed(head)
    with pytest.raises(MessageRefused) as refused:
        undecided.feed(b"x" * 100)  # a field name, or not? Not known within the limit
    assert str(refused.value.reply) == "552 5.3.4 message header exceeds 100 bytes"
