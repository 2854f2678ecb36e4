"""What the hive and the workers both import: job spec, event schema, Redis keys, settings."""
