"""A check both halves run on a text encoder's tokenizer (models/text.py, pipeline/backends/feature_encoders.py)."""
from __future__ import annotations

from affectprep.config import ConfigError

# Ordinary words of the texts affectprep encodes: a real vocabulary knows at least one of them.
PROBE = "the person raises the inner brows and smiles: a happy face"


def require_vocabulary(tokenizer, source: str) -> None:
    """Refuse a tokenizer that turns ordinary words into its unknown token. That is what AutoTokenizer builds from
    a folder that holds a model but no tokenizer files (an empty vocabulary): every word becomes [UNK], silently,
    and training on it learns nothing from the text."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return      # byte-level tokenizers have no unknown token: every text tokenises
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if ids and all(i == unknown for i in ids):
        raise ConfigError(f"{source}: its tokenizer knows no word (every word becomes {tokenizer.unk_token}); the "
                          f"folder has no tokenizer files: save the tokenizer beside the model "
                          f"(tokenizer.save_pretrained(folder))")
