"""Build tiny embedding models for tests: a BERT encoder with a WordPiece tokenizer
(``[CLS] … [SEP]``, lower-casing), saved as a bare ``BertModel`` as embedding models
ship, and the sentence-transformers files that declare a model's pooling."""

from __future__ import annotations

import json
from pathlib import Path

from tests.tiny_models import CORPUS

#: The encoder's longest input, in tokens: a test's long input is truncated to it.
MAX_POSITIONS = 64


def build_wordpiece_tokenizer(max_length: int = MAX_POSITIONS):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def build_encoder(out_dir: str | Path, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """A BERT checkpoint (``architectures: ["BertModel"]``, pooler included) with random weights."""
    import torch
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def declare_pooling(folder: str | Path, *modes: str, dim: int, extra_modules: tuple[str, ...] = ()) -> Path:
    """Writes sentence-transformers' ``modules.json`` (Transformer, Pooling, Normalize,
    then ``extra_modules`` types) and ``1_Pooling/config.json`` with ``modes`` on
    (``cls``, ``mean``, ``max``, ``lasttoken``, …, as sentence-transformers names them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
        "weightedmean": "pooling_mode_weightedmean_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    types = ["Transformer", "Pooling", "Normalize", *extra_modules]
    paths = ["", "1_Pooling", "2_Normalize", *(f"{3 + k}_{name}" for k, name in enumerate(extra_modules))]
    modules = [{"idx": k, "name": str(k), "path": path, "type": f"sentence_transformers.models.{t}"} for k, (t, path) in enumerate(zip(types, paths))]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": dim, **{key: mode in modes for mode, key in keys.items()}, "include_prompt": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2))
    return folder
