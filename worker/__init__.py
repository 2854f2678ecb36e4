"""The Hive worker: a long-lived RQ worker per device that downloads, loads and runs models."""
