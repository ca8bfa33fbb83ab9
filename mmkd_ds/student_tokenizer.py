"""Train a WordPiece tokenizer on a corpus (the demo student's, and the tests' tiny models).

On a cluster the student brings its own tokenizer (``bert-base-multilingual-cased``); offline,
the demo trains a small multilingual vocabulary on both sides of the bundled corpus, so its
subwords differ from the English teacher's and the word level really bridges two tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 4000, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on ``texts``, as a Hugging Face fast tokenizer.

    Inputs are encoded as ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with segment ids 0/1,
    like BERT. ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it.
    """
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
