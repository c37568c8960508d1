"""The prompt a decoder LLM reads, as token ids: ``prefix ⊕ title ⊕ [image prefix ⊕ IMG] ⊕ EOS``.

Products and labels use the same template, e.g. ``This product text`` ⊕ `` acme red shirt`` ⊕ ``<eos>``. Each
segment is tokenised on its own and the ids are concatenated; only the title is truncated, so that the prefix and
the EOS (what ``pooling = "last"`` reads) are always there. The image segment is for products that have an image:
``image prefix`` ids here, the image token(s) themselves come from the encoder's ``extra_embeds``, placed before
the EOS (``xmctag.models.encoder``). Without an image the image prefix is left out.

The template is stored as ids (``PromptTemplate.to_dict`` -> the bundle manifest), and the ids are built from the
``tokenizers`` library alone (no model-specific post-processor), so training, PyTorch inference and ONNX tagging
build identical sequences. No torch here: the tagger imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmctag.errors import UserError

PROBE = ("product", "title words")  # two segments, to see whether segments join with a space (see _segment_join)


@dataclass(frozen=True)
class PromptTemplate:
    prefix_ids: tuple[int, ...]  # BOS (if the model uses one) + the prefix text
    image_prefix_ids: tuple[int, ...]  # the image prefix text (products with an image only)
    eos_id: int
    join: str  # " " or "": put before the title text, so that prefix and title read as one sentence
    image_tokens: int = 1  # extra embeddings per image (counted against max_length)

    @classmethod
    def build(cls, backend, prefix: str, image_prefix: str, eos_id: int, image_tokens: int = 1) -> "PromptTemplate":
        """From a ``tokenizers.Tokenizer`` and the prefix texts."""
        join = _segment_join(backend)
        prefix_ids = _leading_special_ids(backend) + (_ids(backend, prefix) if prefix else [])
        image_ids = _ids(backend, join + image_prefix) if image_prefix else []  # always follows the title
        # Without a prefix text the title starts the sentence, so no leading space before it.
        return cls(tuple(prefix_ids), tuple(image_ids), int(eos_id), join if prefix else "", image_tokens)

    def ids(self, backend, texts: list[str], max_length: int, has_image: list[bool] | None = None) -> list[list[int]]:
        """One id list per text: prefix + title ids (cut to what ``max_length`` leaves) [+ image prefix] + EOS."""
        has_image = has_image or [False] * len(texts)
        titles = backend.encode_batch([self.join + t for t in texts], add_special_tokens=False)
        out = []
        for title, image in zip(titles, has_image):
            tail = (list(self.image_prefix_ids) if image else []) + [self.eos_id]
            budget = self.title_budget(max_length, image)
            out.append(list(self.prefix_ids) + title.ids[:budget] + tail)
        return out

    def title_budget(self, max_length: int, has_image: bool = False, setting: str = "max_length/label_max_length"
                     ) -> int:
        """Title tokens that fit in ``max_length`` next to the fixed parts (image tokens included); ``setting``: the
        setting ``max_length`` comes from, for the error."""
        fixed = len(self.prefix_ids) + 1 + ((len(self.image_prefix_ids) + self.image_tokens) if has_image else 0)
        budget = max_length - fixed
        if budget < 1:
            raise UserError(f"{setting} {max_length} leaves no room for the text: the prompt's fixed parts take "
                            f"{fixed} tokens; raise {setting} or shorten the prompt prefixes")
        return budget

    def to_dict(self) -> dict:
        return {"template": "prefix + title[:budget] + [image_prefix + image] + eos",
                "prefix_ids": list(self.prefix_ids), "image_prefix_ids": list(self.image_prefix_ids),
                "eos_id": self.eos_id, "join": self.join, "image_tokens": self.image_tokens}

    @classmethod
    def from_dict(cls, values: dict) -> "PromptTemplate":
        return cls(tuple(values["prefix_ids"]), tuple(values["image_prefix_ids"]), int(values["eos_id"]),
                   values["join"], int(values.get("image_tokens", 1)))


class PromptTokenizer:
    """A decoder's Hugging Face tokenizer together with its ``PromptTemplate``.

    ``xmctag.models.tokens.token_ids`` builds prompt ids through ``prompt_ids``; ``save_pretrained``, ``is_fast`` and
    ``pad_token_id`` are the wrapped tokenizer's, so code written for encoders' tokenizers works unchanged. The ids
    come from a private ``tokenizers.Tokenizer`` loaded from the same JSON the bundle ships, without padding or
    truncation, i.e. exactly what the tagger uses.
    """

    def __init__(self, hf_tokenizer, template: PromptTemplate):
        from tokenizers import Tokenizer

        self.hf_tokenizer = hf_tokenizer
        self.template = template
        self.backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self.backend.no_padding()
        self.backend.no_truncation()

    def prompt_ids(self, texts: list[str], max_length: int, has_image: list[bool] | None = None) -> list[list[int]]:
        return self.template.ids(self.backend, list(texts), max_length, has_image)

    @property
    def pad_token_id(self) -> int | None:
        return self.hf_tokenizer.pad_token_id

    @property
    def is_fast(self) -> bool:
        return self.hf_tokenizer.is_fast

    def save_pretrained(self, path, **kwargs):
        return self.hf_tokenizer.save_pretrained(path, **kwargs)


def prompt_tokenizer(hf_tokenizer, model_config, config) -> PromptTokenizer:
    """The ``PromptTokenizer`` of a decoder backbone for the prompt settings of ``config`` (a ``Config``)."""
    if not getattr(hf_tokenizer, "is_fast", False):
        raise UserError("decoder models need a fast tokenizer (tokenizer.json): tagging tokenises with `tokenizers`")
    eos_id = eos_id_of(hf_tokenizer, model_config)
    # One token per image slot (xmctag.models.fusion): all max_images slots count against max_length.
    template = PromptTemplate.build(hf_tokenizer.backend_tokenizer, config.prompt_prefix, config.image_prompt_prefix,
                                    eos_id, image_tokens=config.max_images)
    return PromptTokenizer(hf_tokenizer, template)


def eos_id_of(hf_tokenizer, model_config) -> int:
    """The tokenizer's EOS, else the model config's (first one if it lists several)."""
    eos = hf_tokenizer.eos_token_id
    if eos is None:
        eos = getattr(model_config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if eos is None:
        raise UserError("this decoder model has no EOS token (tokenizer and config both lack eos_token_id); "
                        "the prompt ends with one")
    return int(eos)


def _ids(backend, text: str) -> list[int]:
    return backend.encode(text, add_special_tokens=False).ids


def _segment_join(backend) -> str:
    """``" "`` if "a b" tokenises as ids("a") + ids(" b") (byte-level BPE: Qwen2, Llama 3, SmolLM2; SentencePiece
    with a prepended "▁"), ``""`` if as ids("a") + ids("b") (tokenizers that add the word-start marker themselves)."""
    first, second = PROBE
    whole = _ids(backend, f"{first} {second}")
    if whole == _ids(backend, first) + _ids(backend, " " + second):
        return " "
    if whole == _ids(backend, first) + _ids(backend, second):
        return ""
    return " "


def _leading_special_ids(backend) -> list[int]:
    """The special ids the tokenizer's post-processor puts *before* a sequence (a BOS, e.g. Llama 3, Mistral); none
    for Qwen2. What it appends (an EOS, a [SEP]) is dropped: the template adds its own EOS."""
    plain = _ids(backend, PROBE[0])
    full = backend.encode(PROBE[0], add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []
