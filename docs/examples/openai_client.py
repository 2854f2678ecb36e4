"""The official `openai` client against a hive: one chat completion streamed, one not.

Reads HIVE_URL (default http://127.0.0.1:7833), HIVE_MODEL (default hive-demo/tiny-llama)
and HIVE_API_KEY (in local mode any key will do).
"""

from __future__ import annotations

import os

from openai import OpenAI

HIVE_URL = os.environ.get("HIVE_URL", "http://127.0.0.1:7833")
MODEL = os.environ.get("HIVE_MODEL", "hive-demo/tiny-llama")
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]

client = OpenAI(base_url=f"{HIVE_URL}/v1", api_key=os.environ.get("HIVE_API_KEY", "unused"))

# Streamed: one chunk per token that carries text; no usage chunk unless asked for.
print("streamed: ", end="")
stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32, temperature=0.7, seed=42, stream=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

# Not streamed: one chat.completion once the job ends. Its id is chatcmpl-<job_id>.
completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32, temperature=0)
print(f"not streamed: {completion.choices[0].message.content}")
print(f"finish_reason: {completion.choices[0].finish_reason}, usage: {completion.usage.prompt_tokens} + {completion.usage.completion_tokens} tokens, job {completion.id.removeprefix('chatcmpl-')}")
