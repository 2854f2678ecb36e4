"""Wire formats and settings, shared by hive and worker."""

from __future__ import annotations

import json

import pytest

from shared import events
from shared.settings import Settings, redact_url

pytestmark = pytest.mark.unit


def test_event_json_repeats_its_type_first_and_keeps_unicode():
    data = events.Token("日本\n", 3).to_json()
    assert data.startswith('{"event":"token"')
    assert json.loads(data) == {"event": "token", "t": "日本\n", "i": 3}
    assert "\n" not in data  # one data: line


def test_live_message_and_sse_frame_round_trip():
    data = events.End(3, 1.5, 0.5, "eos").to_json()
    seq, type_, parsed = events.parse_live_message(events.live_message(7, "end", data))
    assert (seq, type_, parsed) == (7, "end", data)
    assert events.sse_frame(seq, type_, parsed) == f"id: 7\nevent: end\ndata: {data}\n\n".encode()
    assert events.seq_of(events.stream_id(42)) == 42


def test_settings_hide_the_redis_password():
    settings = Settings(redis_url="redis://user:s3cret@db:6379/0")
    assert "s3cret" not in repr(settings) and "***" in repr(settings)
    assert redact_url("redis://db:6379") == "redis://db:6379"
