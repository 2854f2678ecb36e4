"""``python -m tests.sse_follower BASE_URL SSE_URL [--last-event-id N] [--limit K]``:
follows one job's stream with tests.sse.follow and prints each event as a JSON line
(``{"id", "event", "data"}``), so that a test can follow from another network
namespace than its own (tests/test_multihost.py)."""

from __future__ import annotations

import argparse
import json

from tests.sse import follow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base_url")
    parser.add_argument("sse_url")
    parser.add_argument("--last-event-id")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    for received in follow(args.base_url, args.sse_url, args.last_event_id, args.limit):
        print(json.dumps({"id": received.id, "event": received.event, "data": received.data}), flush=True)


if __name__ == "__main__":
    main()
