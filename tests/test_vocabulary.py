"""A text encoder's folder without tokenizer files: AutoTokenizer builds an empty vocabulary from it and every word
becomes [UNK], silently. Both halves refuse it in one line (affectprep/vocabulary.py)."""
from __future__ import annotations

import pytest
from transformers import BertConfig, BertModel

from affectprep.config import ConfigError
from affectprep.models.text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer
from affectprep.pipeline.backends.feature_encoders import TextTokens

TINY_BERT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def test_a_text_encoder_folder_without_tokenizer_files_is_refused(tmp_path):
    folder = tmp_path / "bert"
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(folder)
    for load in (load_tokenizer, TextTokens):
        with pytest.raises(ConfigError, match="knows no word .*no tokenizer files"):
            load(str(folder))
    tiny_tokenizer().save_pretrained(folder)            # the same folder with its tokenizer saved beside
    assert load_tokenizer(str(folder))("a happy face", add_special_tokens=False)["input_ids"] != [1, 1, 1]
    assert TextTokens(str(folder)).encode(["a happy face"])[0].shape == (5, 16)
