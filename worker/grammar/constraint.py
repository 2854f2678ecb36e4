"""One job's grammar at work: an llguidance matcher that says, before each token,
which tokens the answer may take next, and follows the tokens sampled.

The grammar is compiled on the job's own thread (``compile_constraint``), before
the job joins the batch, so a request with fifty tools never stalls the streams
already running; the engine's step only computes each row's mask (tens of
microseconds a row, measured in docs/benchmarks.md) and applies it.
"""

from __future__ import annotations

import threading
import weakref

import torch

from shared.json_grammar import UnsupportedSchema

#: One llguidance tokenizer per loaded tokenizer: building one walks the whole vocabulary.
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()
_BITS = None


def ll_tokenizer(tokenizer, vocab_size: int, stop_ids: frozenset[int] = frozenset()):
    """llguidance's view of ``tokenizer``, its masks ``vocab_size`` wide (the model's
    logits, which may hold more ids than the tokenizer has); ``stop_ids``: the
    tokens that end the answer (the generation config's, beside the tokenizer's EOS),
    which the grammar allows once it accepts."""
    import llguidance.hf

    key = (vocab_size, stop_ids)
    with _tokenizers_lock:
        cached = _tokenizers.get(tokenizer)
        if cached is None or cached[0] != key:
            eos = sorted(stop_ids) or None
            cached = (key, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos))
            _tokenizers[tokenizer] = cached
        return cached[1]


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (what a logprob's ``bytes`` lists); llguidance
    marks a special token's with a leading 0xFF."""
    with _tokenizers_lock:
        cached = _tokenizers.get(tokenizer)
    if cached is None or token_id >= cached[0][0]:
        return tokenizer.decode([token_id]).encode()
    data = cached[1].decode_bytes([token_id])
    return data[1:] if data[:1] == b"\xff" else data


class Constraint:
    """The matcher of one sequence; ``allowed`` before each token, ``accept`` after."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._mask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)

    def allowed(self, logits: torch.Tensor) -> None:
        """Sets the logits of every token the grammar forbids now to -inf, in place."""
        self.fill(self._mask[0])
        apply_mask(logits, self._mask)

    def fill(self, mask: torch.Tensor) -> None:
        """Writes the bitmask of what may come next into ``mask`` (a contiguous int32 row)."""
        self._matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            # Only a bug can get here: the token was sampled under this very mask.
            raise RuntimeError(f"the grammar refused token {token_id}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing more may follow (the answer ends)."""
        return self._matcher.is_stopped()


def apply_mask(logits: torch.Tensor, masks: torch.Tensor) -> None:
    """-inf where ``masks`` (llguidance's bitmasks, 32 tokens an int32, a row per
    logits row) has a 0 bit, in place, for every row in one operation. By hand:
    llguidance.torch's version runs through torch.compile, which compiles on its
    first call (seconds, and a C compiler on a CPU worker)."""
    global _BITS
    if _BITS is None:
        _BITS = torch.arange(32, dtype=torch.int32)
    width = logits.shape[-1]
    bits = ((masks.unsqueeze(-1) >> _BITS) & 1).reshape(*masks.shape[:-1], -1)[..., :width].to(logits.device, non_blocking=True)
    if width > bits.shape[-1]:  # ids past the tokenizer's: never allowed
        logits[..., bits.shape[-1] :] = float("-inf")
        logits = logits[..., : bits.shape[-1]]
    logits.masked_fill_(bits.reshape(logits.shape) == 0, float("-inf"))


def masks_for(constraints: list[Constraint], vocab_size: int) -> torch.Tensor:
    """The bitmasks of several rows, one row each, for ``apply_mask`` in one go."""
    masks = torch.empty((len(constraints), (vocab_size + 31) // 32), dtype=torch.int32)
    for row, constraint in enumerate(constraints):
        constraint.fill(masks[row])
    return masks


def compile_constraint(grammar: str, tokenizer, vocab_size: int, stop_ids: frozenset[int]) -> Constraint:
    """The matcher for ``grammar``; UnsupportedSchema names what cannot be enforced."""
    from llguidance import LLMatcher

    matcher = LLMatcher(ll_tokenizer(tokenizer, vocab_size, stop_ids), grammar, log_level=0)
    if matcher.is_error():
        raise UnsupportedSchema(matcher.get_error())
    return Constraint(matcher, vocab_size)
