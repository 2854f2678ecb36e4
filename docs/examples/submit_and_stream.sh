#!/usr/bin/env bash
# Submit a prompt to a hive, then print its stream as it arrives, until `data: [DONE]`.
#
#   HIVE_URL      the hive (default http://127.0.0.1:7833)
#   HIVE_MODEL    a hub repo id (default hive-demo/tiny-llama, the model `hive up` serves)
#   HIVE_API_KEY  only for a hive with API keys
set -euo pipefail

HIVE_URL=${HIVE_URL:-http://127.0.0.1:7833}
HIVE_MODEL=${HIVE_MODEL:-hive-demo/tiny-llama}
auth=()
if [[ -n ${HIVE_API_KEY:-} ]]; then
  auth=(-H "Authorization: Bearer $HIVE_API_KEY")
fi

# The request body, built with python3 so that any model name is quoted right.
body=$(HIVE_MODEL=$HIVE_MODEL python3 -c 'import json, os
print(json.dumps({"model": os.environ["HIVE_MODEL"], "prompt": "The quick brown fox", "max_tokens": 32}))')

# 202 Accepted: {"job_id": ..., "state": "queued", "position": ..., "sse_url": ..., "status_url": ...}
job=$(curl -sS --fail-with-body ${auth[@]+"${auth[@]}"} "$HIVE_URL/v1/inference" \
  -H 'Content-Type: application/json' -d "$body")
sse_url=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["sse_url"])' <<<"$job")

# Every event from the job's first: queued, download, loading, ready, started, token ..., end.
# The hive closes the stream after `data: [DONE]`, and curl exits.
curl -sS -N --fail ${auth[@]+"${auth[@]}"} "$HIVE_URL$sse_url"
