"""The Hive service: HTTP API, SSE relay and the ``hive`` command. Never imports torch."""
