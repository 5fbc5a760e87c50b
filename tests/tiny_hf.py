"""Tiny random-init Hugging Face model folders (config + tokenizer, no weights) for tests."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["good", "great", "fine", "nice", "love", "best", "fun", "happy", "bad", "awful", "poor", "sad", "hate", "worst", "dull", "boring", "the", "a", "movie", "film", "plot", "was", "is", "very", "not", "it", "and"]

CONFIGS = {
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32,
             "n_layer": 2, "n_head": 2, "n_positions": 64, "bos_token_id": 1,
             "eos_token_id": 1},
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 64, "bos_token_id": 1,
              "eos_token_id": 1},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 64, "bos_token_id": 1,
              "eos_token_id": 1},
    "bert": {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 64, "pad_token_id": 0},
}


def make_tiny_hf(folder: Path, kind: str) -> Path:
    """A model folder of ``kind`` (gpt2 | llama | qwen2 | bert) whose tokenizer has no pad
    token for the decoders, as GPT-2's and Llama's do not."""
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = _byte_bpe(folder) if kind == "qwen2" else _word_level(folder, kind)
    conf = {**CONFIGS[kind], "vocab_size": n_vocab}
    (folder / "config.json").write_text(json.dumps(conf))
    return folder


def write_text_dataset(root: Path, n_per_class: int = 12) -> Path:
    """train/test TSVs of a two-class toy sentiment task made of the tokenizer's words."""
    import random

    rng = random.Random(0)
    pos, neg = WORDS[:8], WORDS[8:16]
    filler = WORDS[16:]
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_per_class), ("test", n_per_class // 2)):
        rows = ["text\tlabel"]
        for label, words in ((1, pos), (0, neg)):
            for _ in range(n):
                sent = [rng.choice(filler) for _ in range(rng.randint(1, 4))]
                sent += [rng.choice(words) for _ in range(rng.randint(1, 3))]
                rng.shuffle(sent)
                rows.append(f"{' '.join(sent)}\t{label}")
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def _word_level(folder: Path, kind: str) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "<eos>", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else \
        ["[UNK]", "<eos>"]
    vocab = {w: i for i, w in enumerate(special + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = ({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"} if kind == "bert" else {})
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>",
                            **extra).save_pretrained(folder)
    return len(vocab)


def _byte_bpe(folder: Path) -> int:
    """Qwen2's own tokenizer class reads a byte-level BPE (vocab.json + merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=300, special_tokens=["<eos>"])
    tok.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return tok.get_vocab_size()
