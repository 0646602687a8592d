"""Event shapes from AWS's documentation become object references; names are stable and within limits."""

import json
from datetime import UTC, datetime

import pytest

from common.events import objects_in_message
from common.naming import (
    ResourceNames,
    data_version,
    execution_name,
    object_identity,
    slugify,
)

KEY = "datasets/churn/Churn 2026 été+q4.csv"


def test_s3_notification_through_sqs_decodes_the_key(event_fixture):
    record = event_fixture("sqs_s3_object_created.json")["Records"][0]
    (ref,) = objects_in_message(record["body"])
    assert ref.key == KEY  # '+' is a space, '%2B' a plus, percent-encoded UTF-8 decoded
    assert ref.bucket == "conveyor-raw-123456789012-us-east-1"
    assert ref.version_id == "096fKKXTRTtl3on89fVO.nfljtsv6qko"
    assert ref.size == 1305107


def test_eventbridge_object_created_keeps_the_key_as_is(event_fixture):
    (ref,) = objects_in_message(event_fixture("eventbridge_s3_object_created.json"))
    assert ref.key == KEY
    assert ref.version_id == "096fKKXTRTtl3on89fVO.nfljtsv6qko"


def test_s3_test_event_announces_nothing(event_fixture):
    assert objects_in_message(json.dumps(event_fixture("s3_test_event.json"))) == []


def test_unknown_message_is_an_error():
    with pytest.raises(ValueError, match="neither"):
        objects_in_message('{"hello": 1}')


@pytest.mark.parametrize(
    ("name", "slug"),
    [("churn", "churn"), ("My_Churn.v2", "my-churn-v2"), ("  --x--  ", "x"), ("a" * 60, "a" * 40)],
)
def test_slugify(name, slug):
    assert slugify(name) == slug


def test_slugify_rejects_names_without_letters_or_digits():
    with pytest.raises(ValueError):
        slugify("__..__")


def test_identity_prefers_version_id_and_falls_back_to_etag():
    by_version = object_identity("b", "k", "v1", '"etag"')
    assert by_version == object_identity("b", "k", "v1", '"other"')
    assert object_identity("b", "k", None, '"etag"') == object_identity("b", "k", "null", "etag")
    assert object_identity("b", "k", None, "etag") != object_identity("b", "k", None, "etag2")
    assert object_identity("b", "k", "v1", None) != object_identity("b2", "k", "v1", None)


def test_names_fit_the_service_limits():
    identity = object_identity("b", "k", "v", None)
    version = data_version(datetime(2026, 11, 22, 17, 55, tzinfo=UTC), identity)
    assert version.startswith("20261122T175500Z-")
    name = execution_name("x" * 40, identity)
    assert len(name) <= 80
    names = ResourceNames.for_version("a-rather-long-stack-name-for-conveyor", "y" * 40, version)
    for value in names.as_dict().values():
        assert len(value) <= 63
        assert not value.endswith("-")
    assert names.variant == "AllTraffic"  # the same in every config: blue/green needs it
