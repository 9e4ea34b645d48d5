"""VideoCLIP's text tower (Xu et al. 2021; fairseq examples/MMPT), GRACE's text encoder E_t (Sec. III-B c).

Facts of the public release: VideoCLIP (`MMFusionSeparate`) keeps two towers; the text tower is a plain Hugging
Face `BertModel` initialised from bert-base-uncased (`text_encoder_cls: BertModel`, `bert_name`), fed [CLS] text
[SEP] with all-zero token types, i.e. what a BERT tokenizer gives. The fairseq checkpoint (checkpoint_best.pt)
nests the weights under "model" with the prefix "mmmodel.text_encoder." (MMPT's own loader strips "mmmodel.").
GRACE reads the token states, so the tower's pooler (which VideoCLIP does not use either: it mean-pools) and the
`embeddings.position_ids` buffer older transformers versions saved are left out. The architecture (config) and
tokenizer come from the BERT the tower was initialised from, a Hugging Face folder or hub id.
"""
from __future__ import annotations

from pathlib import Path

from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

from affectprep.config import ConfigError

from ..text import load_tokenizer
from .checkpoints import load_exactly, nested_state_dict, read_checkpoint, split_keys

PREFIXES = ("mmmodel.text_encoder.", "text_encoder.")
_WHAT = "VideoCLIP checkpoint"


def load_videoclip_text(path: Path | str, base: str) -> tuple[BertModel, PreTrainedTokenizerBase, list[str]]:
    """The text tower of a VideoCLIP checkpoint as a BertModel (no pooler) shaped like `base`, `base`'s tokenizer,
    and the checkpoint's text-tower names left out (pooler, position_ids). Mismatches are ConfigErrors."""
    state = nested_state_dict(read_checkpoint(path, _WHAT), path, _WHAT)
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ConfigError(f"{_WHAT} {path} holds no text tower (no key starts with {' or '.join(PREFIXES)}; "
                          f"its keys start with {', '.join(sorted({k.split('.')[0] for k in state})[:4])})")
    tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    tower, ignored = split_keys(tower, lambda k: k.startswith("pooler.") or k == "embeddings.position_ids")
    try:
        config = BertConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text_base '{base}': cannot read the BERT configuration the VideoCLIP text tower "
                          f"was initialised from ({str(e).splitlines()[0]})") from None
    model = BertModel(config, add_pooling_layer=False)
    load_exactly(model, tower, path, _WHAT)
    return model, load_tokenizer(base), ignored
