"""validate_message: every rule of the wire contract, the clock-skew math, the events row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.collect import tables
from closedloop.collect.messages import (
    EVENT_COLUMNS,
    EXTERNAL_ID_COLUMNS,
    FAILED_COLUMNS,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    AcceptedMessage,
    Reason,
    RejectedMessage,
    derived_message_id,
    failure_row,
    parse_number,
    serialized_size,
    validate_message,
)
from closedloop.core.definitions import DataClass, Source

from .conftest import NOW

SOURCE = Source(
    name="app",
    channel="miniprogram",
    data_class=DataClass.SECOND_PARTY,
    write_key="wk_app_00000001",
)


def check(raw: object, **kw: Any) -> AcceptedMessage | RejectedMessage:
    kw.setdefault("received_at", NOW)
    return validate_message(raw, source=SOURCE, location="f.jsonl:7", **kw)


def accepted(raw: object, **kw: Any) -> dict[str, Any]:
    result = check(raw, **kw)
    assert isinstance(result, AcceptedMessage), result
    return result.row


def rejected(raw: object, **kw: Any) -> RejectedMessage:
    result = check(raw, **kw)
    assert isinstance(result, RejectedMessage), result
    return result


def msg(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "track",
        "event": "Signed Up",
        "userId": "u1",
        "messageId": "m1",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


# ---- shape ----------------------------------------------------------------------------------
def test_column_lists_match_the_declared_tables() -> None:
    assert set(EVENT_COLUMNS) == set(tables.EVENTS.columns)
    assert len(EVENT_COLUMNS) == len(tables.EVENTS.columns)
    assert set(EXTERNAL_ID_COLUMNS) == set(tables.EVENT_EXTERNAL_IDS.columns)
    assert set(FAILED_COLUMNS) == set(tables.FAILED_EVENTS.columns)


def test_accepted_row_has_exactly_the_events_columns_and_fits_the_schema() -> None:
    row = accepted(msg(properties={"a": 1}), load_id="ld_1")
    assert list(row) == list(EVENT_COLUMNS)
    assert row["load_id"] == "ld_1"
    assert (row["source"], row["channel"], row["data_class"]) == (
        "app",
        "miniprogram",
        "second_party",
    )
    schema = tables.EVENTS.schema.to_pyarrow()
    table = pa.Table.from_pylist([row], schema=schema)
    assert table.num_rows == 1


@pytest.mark.parametrize(
    ("raw", "kind"),
    [([1, 2], "array"), ("track", "string"), (42, "number"), (None, "null"), (True, "boolean")],
)
def test_a_message_must_be_a_json_object(raw: object, kind: str) -> None:
    r = rejected(raw)
    assert r.reason_code is Reason.MALFORMED
    assert kind in r.reason
    assert r.location == "f.jsonl:7"


def test_type_is_required_and_must_be_known() -> None:
    r = rejected(msg(type=...))
    assert (r.reason_code, r.message_id) == (Reason.MISSING_FIELD, "m1")
    assert "`type`" in r.reason
    assert rejected(msg(type="purchase")).reason_code is Reason.UNKNOWN_TYPE
    assert rejected(msg(type=["track"])).reason_code is Reason.UNKNOWN_TYPE
    assert rejected(msg(type="Track")).reason_code is Reason.UNKNOWN_TYPE


@pytest.mark.parametrize("mtype", ["identify", "track", "page", "screen", "group", "alias"])
def test_every_message_needs_an_identity(mtype: str) -> None:
    raw = msg(type=mtype, userId=..., groupId="g1", previousId="p1")
    r = rejected(raw)
    expected = Reason.MISSING_FIELD if mtype == "alias" else Reason.MISSING_IDENTITY
    assert r.reason_code is expected
    assert "userId" in r.reason


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_blank_ids_count_as_missing(blank: object) -> None:
    r = rejected(msg(userId=blank, anonymousId=blank))
    assert r.reason_code is Reason.MISSING_IDENTITY
    assert r.reason == "track message needs `userId` or `anonymousId`"


def test_anonymous_id_alone_is_enough() -> None:
    row = accepted(msg(userId=..., anonymousId="a-1"))
    assert (row["user_id"], row["anonymous_id"]) == (None, "a-1")


@pytest.mark.parametrize(
    ("value", "text"), [(123, "123"), (12.0, "12"), (1.5, "1.5"), ("007", "007")]
)
def test_numeric_ids_become_strings(value: object, text: str) -> None:
    assert accepted(msg(userId=value))["user_id"] == text
    assert accepted(msg(userId=..., anonymousId=value))["anonymous_id"] == text


@pytest.mark.parametrize("value", [True, {"id": 1}, [1], float("nan"), float("inf")])
def test_ids_of_other_kinds_are_invalid(value: object) -> None:
    r = rejected(msg(userId=value))
    assert r.reason_code is Reason.INVALID_FIELD
    assert "`userId`" in r.reason


def test_track_needs_event() -> None:
    r = rejected(msg(event=...))
    assert (r.reason_code, r.reason) == (Reason.MISSING_FIELD, "track message needs `event`")
    assert rejected(msg(event="")).reason_code is Reason.MISSING_FIELD
    assert rejected(msg(event=5)).reason_code is Reason.INVALID_FIELD


def test_group_needs_group_id_which_is_kept_in_properties() -> None:
    r = rejected(msg(type="group", event=...))
    assert (r.reason_code, r.reason) == (Reason.MISSING_FIELD, "group message needs `groupId`")
    row = accepted(msg(type="group", event=..., groupId=77, traits={"plan": "pro"}))
    assert json.loads(row["properties"]) == {"groupId": "77", "traits": {"plan": "pro"}}
    assert row["traits"] is None  # a group's traits describe the group, not the user
    assert row["event"] is None


def test_alias_needs_previous_id_and_user_id() -> None:
    r = rejected(msg(type="alias", event=...))
    assert (r.reason_code, r.reason) == (Reason.MISSING_FIELD, "alias message needs `previousId`")
    r = rejected(msg(type="alias", userId=..., anonymousId="a1", previousId="p1"))
    assert r.reason_code is Reason.MISSING_FIELD
    assert "`userId`" in r.reason
    row = accepted(msg(type="alias", event=..., previousId="anon-9"))
    assert json.loads(row["properties"]) == {"previousId": "anon-9"}


def test_page_and_screen_names_fill_the_event_column() -> None:
    assert accepted(msg(type="page", event=..., name="Home"))["event"] == "Home"
    assert accepted(msg(type="screen", event=..., name="Cart"))["event"] == "Cart"
    assert accepted(msg(type="page", event=...))["event"] is None
    assert rejected(msg(type="page", name=3)).reason_code is Reason.INVALID_FIELD


def test_identify_has_no_event_and_keeps_its_traits() -> None:
    row = accepted(msg(type="identify", event=..., traits={"email": "a@b.c"}))
    assert (row["type"], row["event"]) == ("identify", None)
    assert json.loads(row["traits"]) == {"email": "a@b.c"}


# ---- messageId ------------------------------------------------------------------------------
def test_message_id_at_most_100_characters() -> None:
    assert accepted(msg(messageId="x" * 100))["message_id"] == "x" * 100
    r = rejected(msg(messageId="x" * 101))
    assert r.reason_code is Reason.INVALID_FIELD
    assert "101 characters" in r.reason


def test_message_id_of_other_kinds() -> None:
    assert accepted(msg(messageId=42))["message_id"] == "42"
    assert rejected(msg(messageId={"a": 1})).reason_code is Reason.INVALID_FIELD
    assert rejected(msg(messageId="  ")).reason_code is Reason.INVALID_FIELD


def test_missing_message_id_is_derived_deterministically_from_content() -> None:
    a = {"type": "track", "event": "E", "userId": "u1", "properties": {"x": 1, "y": [1, 2]}}
    reordered = {"properties": {"y": [1, 2], "x": 1}, "userId": "u1", "event": "E", "type": "track"}
    first = accepted(a)["message_id"]
    assert (
        first == accepted(reordered)["message_id"] == accepted(dict(a, messageId=""))["message_id"]
    )
    assert first.startswith("cl-")
    assert len(first) <= 100
    assert accepted(dict(a, event="F"))["message_id"] != first
    other = Source(name="pos", channel="pos", write_key="wk_pos_00000001")
    assert derived_message_id(a, other) != derived_message_id(a, SOURCE)


def test_a_rejected_message_keeps_its_message_id_for_erasure() -> None:
    assert rejected(msg(event=...)).message_id == "m1"
    assert rejected(msg(event=..., messageId=...)).message_id is not None


# ---- size -----------------------------------------------------------------------------------
def test_messages_over_32_kb_are_too_large() -> None:
    raw = msg(properties={"blob": "x" * MAX_MESSAGE_BYTES})
    r = rejected(raw)
    assert r.reason_code is Reason.TOO_LARGE
    assert "32 KB" in r.reason
    # the size is measured on the compact UTF-8 serialisation; the caller may supply it
    filler = MAX_MESSAGE_BYTES - serialized_size(msg(properties={"blob": ""}))
    exact = msg(properties={"blob": "x" * filler})
    assert serialized_size(exact) == MAX_MESSAGE_BYTES
    assert isinstance(check(exact), AcceptedMessage)
    assert isinstance(check(msg(), size=MAX_MESSAGE_BYTES + 1), RejectedMessage)


def test_size_counts_utf8_bytes_not_characters() -> None:
    chars = MAX_MESSAGE_BYTES // 3 + 10  # fewer characters than the limit, more bytes
    assert rejected(msg(properties={"name": "茶" * chars})).reason_code is Reason.TOO_LARGE


# ---- times ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2024-03-01T10:00:00Z", datetime(2024, 3, 1, 10, tzinfo=UTC)),
        ("2024-03-01T10:00:00.123Z", datetime(2024, 3, 1, 10, 0, 0, 123000, tzinfo=UTC)),
        ("2024-03-01T18:00:00+08:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),
        ("2024-03-01T05:00:00-05:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),
        ("2024-03-01T10:00:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),  # naive = UTC
        ("2024-03-01 10:00:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),
    ],
)
def test_times_are_iso_8601_stored_in_utc(text: str, utc: datetime) -> None:
    row = accepted(msg(timestamp=text))
    assert row["timestamp"] == utc
    assert row["timestamp"].utcoffset() == timedelta(0)
    assert row["original_timestamp"] == utc


@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp", "sentAt", "receivedAt"])
@pytest.mark.parametrize("value", ["yesterday", "2024-13-01T00:00:00Z", 1709287200, ""])
def test_bad_times_are_invalid_fields_named(field: str, value: object) -> None:
    r = rejected(msg(**{field: value}))
    assert r.reason_code is Reason.INVALID_FIELD
    assert f"`{field}`" in r.reason


def test_received_at_is_stamped_unless_the_message_carries_one() -> None:
    assert accepted(msg())["received_at"] == NOW
    kept = accepted(msg(receivedAt="2024-02-01T00:00:00+01:00"))
    assert kept["received_at"] == datetime(2024, 1, 31, 23, tzinfo=UTC)
    naive_stamp = accepted(msg(), received_at=datetime(2024, 3, 1, 12))
    assert naive_stamp["received_at"] == NOW


def test_without_a_timestamp_the_receipt_time_is_used() -> None:
    row = accepted(msg())
    assert row["timestamp"] == NOW
    assert row["original_timestamp"] is None
    assert row["sent_at"] is None


def test_clock_skew_is_corrected_from_sent_at() -> None:
    # The device clock is 1 hour fast: it created the message at (device) 13:00:00 and sent
    # it 5 s later at (device) 13:00:05; the server received it at 12:00:06 real time.
    row = accepted(
        msg(
            originalTimestamp="2024-03-01T13:00:00Z",
            sentAt="2024-03-01T13:00:05Z",
            receivedAt="2024-03-01T12:00:06Z",
        )
    )
    assert row["timestamp"] == datetime(2024, 3, 1, 12, 0, 1, tzinfo=UTC)
    assert row["original_timestamp"] == datetime(2024, 3, 1, 13, tzinfo=UTC)
    assert row["sent_at"] == datetime(2024, 3, 1, 13, 0, 5, tzinfo=UTC)


def test_clock_skew_uses_timestamp_when_there_is_no_original_timestamp() -> None:
    # Segment libraries send the device time as `timestamp`; the stamp is the receipt time.
    row = accepted(msg(timestamp="2024-03-01T11:59:00+00:00", sentAt="2024-03-01T11:59:30Z"))
    assert row["timestamp"] == NOW - timedelta(seconds=30)
    assert row["original_timestamp"] == datetime(2024, 3, 1, 11, 59, tzinfo=UTC)


def test_without_sent_at_the_timestamp_is_kept() -> None:
    row = accepted(msg(timestamp="2023-01-01T00:00:00Z"))
    assert row["timestamp"] == datetime(2023, 1, 1, tzinfo=UTC)


def test_skew_correction_out_of_range_is_invalid_not_a_crash() -> None:
    r = rejected(msg(originalTimestamp="9999-12-31T00:00:00Z", sentAt="0001-01-02T00:00:00Z"))
    assert r.reason_code is Reason.INVALID_FIELD


# ---- JSON columns and promotions ------------------------------------------------------------
def test_properties_traits_context_are_compact_json() -> None:
    context = {"ip": "1.2.3.4", "traits": {"phone": "+8613800000000"}, "locale": "zh-CN"}
    row = accepted(msg(properties={"b": 1, "a": "茶"}, context=context))
    assert row["properties"] == '{"b":1,"a":"茶"}'
    assert json.loads(row["context"]) == context
    assert " " not in row["context"].replace("zh-CN", "")
    assert json.loads(row["traits"]) == {"phone": "+8613800000000"}  # from context.traits


def test_identify_traits_win_over_context_traits() -> None:
    row = accepted(
        msg(type="identify", traits={"email": "x@y.z"}, context={"traits": {"email": "old@y.z"}})
    )
    assert json.loads(row["traits"]) == {"email": "x@y.z"}


@pytest.mark.parametrize("field", ["properties", "context"])
def test_json_fields_must_be_objects(field: str) -> None:
    r = rejected(msg(**{field: ["a"]}))
    assert (r.reason_code, r.reason) == (
        Reason.INVALID_FIELD,
        f"`{field}` must be an object, got array",
    )


def test_values_json_cannot_carry_are_refused() -> None:
    assert rejected(msg(properties={"x": float("nan")})).reason_code is Reason.INVALID_FIELD
    assert rejected(msg(context={"x": float("inf")})).reason_code is Reason.INVALID_FIELD
    assert rejected(msg(properties={"x": "\ud800"})).reason_code is Reason.INVALID_FIELD
    assert rejected(msg(userId="\udfff")).reason_code is Reason.INVALID_FIELD


def test_deep_nesting_is_refused_not_raised() -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(5000):
        inner["a"] = {}
        inner = inner["a"]
    r = rejected(msg(properties=deep), size=100)
    assert r.reason_code is Reason.MALFORMED


def test_huge_integers_are_refused_or_ignored_never_raised() -> None:
    huge = 10**5000  # longer than Python will print
    assert rejected(msg(userId=huge)).reason_code is Reason.INVALID_FIELD
    assert rejected(msg(properties={"n": huge})).reason_code is Reason.INVALID_FIELD
    assert rejected(msg(messageId=..., extra=huge)).reason_code is Reason.MALFORMED
    assert accepted(msg(extra=huge))["message_id"] == "m1"  # unknown fields are not stored


def test_e_commerce_columns_are_promoted() -> None:
    props = {
        "order_id": 9001,
        "revenue": "129.50",
        "coupon": "SPRING",
        "products": [{"sku": "a"}, {"sku": "b", "category": "Tea"}],
    }
    row = accepted(msg(event="Order Completed", properties=props))
    assert (row["order_id"], row["revenue"], row["category"], row["coupon"]) == (
        "9001",
        129.5,
        "Tea",
        "SPRING",
    )
    assert accepted(msg(properties={"total": 10, "category": "Cups"}))["revenue"] == 10.0
    assert accepted(msg(properties={"total": 10}))["category"] is None
    assert accepted(msg(properties={"revenue": "abc", "total": 5}))["revenue"] is None
    assert accepted(msg(properties={"revenue": True}))["revenue"] is None
    assert accepted(msg(type="identify", traits={"revenue": 5}))["revenue"] is None


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (3, 3.0),
        (2.5, 2.5),
        ("1e3", 1000.0),
        (" 7.25 ", 7.25),
        ("-0.5", -0.5),
        ("nan", None),
        ("inf", None),
        ("1_000", None),
        ("1,000", None),
        ("", None),
        (None, None),
        (False, None),
        (10**400, None),
        ([1], None),
    ],
)
def test_parse_number(value: object, number: float | None) -> None:
    assert parse_number(value) == number


def test_external_ids_become_rows_incomplete_ones_skipped() -> None:
    ext = [
        {"id": "o_abc", "type": "wechat_openid", "collection": "users", "encoding": "none"},
        {"id": 12345, "type": "member_no"},
        {"id": "o_abc", "type": "wechat_openid"},  # repeated
        {"type": "email"},
        {"id": "x"},
        "not an object",
        {"id": "", "type": "email"},
    ]
    result = check(msg(context={"externalIds": ext}))
    assert isinstance(result, AcceptedMessage)
    assert result.external_ids == [
        {"message_id": "m1", "type": "wechat_openid", "id": "o_abc", "collection": "users"},
        {"message_id": "m1", "type": "member_no", "id": "12345", "collection": None},
    ]
    other = check(msg(context={"externalIds": "nope"}))
    assert isinstance(other, AcceptedMessage)
    assert other.external_ids == []


def test_failure_rows_are_truncated_and_keyed_by_place_and_content() -> None:
    r = rejected(msg(event=...))
    row = failure_row(
        r, source="app", payload="p" * (MAX_PAYLOAD_BYTES + 5), failed_at=NOW, load_id="l"
    )
    assert set(row) == set(FAILED_COLUMNS)
    assert len(row["payload"]) == MAX_PAYLOAD_BYTES
    cjk = failure_row(r, source="app", payload="茶" * MAX_PAYLOAD_BYTES, failed_at=NOW, load_id="l")
    assert cjk["payload"] == "茶" * (MAX_PAYLOAD_BYTES // 3)  # cut on bytes, whole characters
    odd = failure_row(r, source="app", payload="a\ud800b", failed_at=NOW, load_id="l")
    assert odd["payload"] == "a?b"
    assert row["reason_code"] == "missing_field"
    again = failure_row(
        r, source="app", payload="p" * MAX_PAYLOAD_BYTES, failed_at=NOW, load_id="x"
    )
    assert again["failure_id"] == row["failure_id"]
    elsewhere = RejectedMessage(r.reason_code, r.reason, "f.jsonl:8", r.message_id)
    moved = failure_row(elsewhere, source="app", payload="p", failed_at=NOW, load_id="l")
    assert moved["failure_id"] != row["failure_id"]


# ---- properties -----------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
times = st.one_of(
    st.datetimes(timezones=st.just(UTC) | st.none()).map(lambda t: t.isoformat()),
    st.text(max_size=30),
    json_values,
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["identify", "track", "page", "screen", "group", "alias"])
        | json_values,
        "userId": st.text(max_size=10) | st.integers() | st.floats() | json_values,
        "anonymousId": st.text(max_size=10) | json_values,
        "messageId": st.text(max_size=120) | st.integers() | json_values,
        "event": st.text(max_size=10) | json_values,
        "name": st.text(max_size=10) | json_values,
        "groupId": st.text(max_size=5) | json_values,
        "previousId": st.text(max_size=5) | json_values,
        "timestamp": times,
        "originalTimestamp": times,
        "sentAt": times,
        "receivedAt": times,
        "properties": st.dictionaries(
            st.sampled_from(["revenue", "total", "order_id", "category", "coupon", "products"])
            | st.text(max_size=5),
            json_values,
        )
        | json_values,
        "traits": st.dictionaries(st.text(max_size=5), json_values) | json_values,
        "context": st.fixed_dictionaries(
            {},
            optional={
                "traits": json_values,
                "externalIds": st.lists(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "id": json_values,
                            "type": json_values,
                            "collection": json_values,
                        },
                    )
                    | json_values,
                    max_size=3,
                )
                | json_values,
            },
        )
        | json_values,
    },
)
EVENTS_SCHEMA = tables.EVENTS.schema.to_pyarrow()


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_is_accepted_or_rejected_never_raised(raw: object) -> None:
    result = check(raw)
    assert isinstance(result, AcceptedMessage | RejectedMessage)


@settings(max_examples=500, deadline=None)
@given(message_like)
def test_any_message_like_object_is_accepted_or_rejected_and_accepted_rows_store(
    raw: dict[str, Any],
) -> None:
    result = check(raw)
    if isinstance(result, RejectedMessage):
        assert isinstance(result.reason_code, Reason)
        assert result.reason
        assert result.location == "f.jsonl:7"
        return
    assert isinstance(result, AcceptedMessage)
    row = result.row
    assert row["type"] in ("identify", "track", "page", "screen", "group", "alias")
    assert row["user_id"] or row["anonymous_id"]
    assert 0 < len(row["message_id"]) <= 100
    for col in ("timestamp", "received_at"):
        assert row[col].utcoffset() == timedelta(0)
    for col in ("properties", "traits", "context"):
        if row[col] is not None:
            json.loads(row[col])
    # whatever was accepted can be written: it converts to the events schema
    pa.Table.from_pylist([row], schema=EVENTS_SCHEMA)
    for ext in result.external_ids:
        assert ext["id"] and ext["type"]


def test_python_callers_odd_values_are_refused_never_raised() -> None:
    # The HTTP collector hands over parsed JSON, but nothing stops a Python caller passing
    # keys and values JSON cannot hold: the gate still answers instead of raising.
    assert isinstance(check({1: "a", "b": 2, (1, 2): 3}), RejectedMessage)
    assert rejected(msg(properties={"when": datetime(2024, 1, 1)})).reason_code is (
        Reason.INVALID_FIELD
    )
    assert parse_number("٣") is None  # only ASCII digits are amounts
