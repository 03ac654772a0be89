"""A character-level tokenizer built locally (no hub access), as a ``PreTrainedTokenizerFast``.

Vocabulary: the special tokens ``<pad> <s> </s> <unk> <|system|> <|user|> <|assistant|>``
followed by every printable ASCII character and ``\\n``. Each character is one token; the
chat template is::

    <s><|user|>{user}<|assistant|>{assistant}</s>...   (+ "<|assistant|>" as generation prompt)

``save_pretrained`` writes ``tokenizer.json``/``tokenizer_config.json`` (template included), so
``AutoTokenizer.from_pretrained(checkpoint_dir)`` loads it back.
"""

from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer():
    """Return a character-level ``PreTrainedTokenizerFast`` with pad/bos/eos/unk and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space, \n
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=list(SPECIAL_TOKENS[4:]))
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast
