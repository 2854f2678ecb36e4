"""Which worker most likely holds a prompt's prefix in its cache: the hive's side of
cache-aware routing (worker/kv/prefix.py is the cache itself).

The hive has no tokenizer, so it keys prefixes by characters, as SGLang's router
does: the prompt's text (a chat's messages joined with their roles) cut at 512,
1,024, 2,048 … characters, each cut hashed with the model and the API key's owner
(a key's prompts are cached apart from another's: worker/kv/prefix.py).
Each hash names, in Redis, the worker that last ran a job starting so
(``keys.prefix_affinity``, for AFFINITY_TTL_S); the submit script prefers that
worker among the idle ones holding the model, unless it is far busier than the
best of them (hive/jobs/submit_script.py). Doubling cuts keep it to a few keys a
job: requests that share a 2,000-character system prompt and differ after it share
their 512- and 1,024-character cuts, which is enough to route them together.
"""

from __future__ import annotations

import hashlib

from shared.spec import InferenceRequest

#: The shortest cut: shorter prompts are cheap to compute anywhere.
FIRST_CUT_CHARS = 512
#: The longest: 2**6 × 512 characters, some 8K tokens.
CUTS = 7
#: How long an affinity lasts without a job renewing it: about as long as a worker's
#: cache keeps an unused prefix under a steady load.
AFFINITY_TTL_S = 600


def prompt_text(request: InferenceRequest) -> str:
    """The request's text in the order the model sees it (chat: role, then content)."""
    if request.messages is None:
        return request.prompt or ""
    return "".join(f"{m.role}\0{m.content or ''}\0" for m in request.messages)


def prefix_hashes(request: InferenceRequest, owner: str) -> list[str]:
    """The prompt's cuts' hashes, longest first; none for a request that skips the cache."""
    if not request.prefix_cache:
        return []
    text = prompt_text(request)
    seed = f"{request.model}\0{request.revision or ''}\0{owner}\0"
    hashes = []
    cut = FIRST_CUT_CHARS
    for _ in range(CUTS):
        if cut > len(text):
            break
        hashes.append(hashlib.blake2b((seed + text[:cut]).encode(), digest_size=8).hexdigest())
        cut *= 2
    return hashes[::-1]
