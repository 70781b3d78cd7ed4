"""shapes-llava's parts: the word-level tokenizer, the ``LlavaProcessor`` and the
``LlavaForConditionalGeneration``, built offline, plus the image normalisation
the saved processor applies.

Nothing here trains: the recipe, the evaluation and a test that needs a tiny
random LLaVA all build from these.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal import shapesworld as sw
from multimodal.zoo.shapes_llava.config import (BOS, DESCRIBE_PROMPT, EOS, IMAGE, MEAN, PAD, SPECIALS, STD,
                                                ShapesLlavaConfig)


def split_words(text: str) -> list[str]:
    """The word-level tokenizer's pre-tokenisation: words and runs of punctuation."""
    return re.findall(r"\w+|[^\w\s]+", text)


def word_list() -> list[str]:
    """Every token a ShapesWorld caption, prompt or question can hold, special tokens first.

    Built from the ShapesWorld phrase tables, so a new synonym or template
    there is in the vocabulary of the next trained model.
    """
    texts: list[str] = []
    vocab = sw.vocabulary()
    for attribute in ("shape", "colour", "size", "position", "texture"):
        texts += list(vocab[attribute])
    texts += [w for options in sw.SYNONYMS.values() for w in options]
    texts += [w for options in sw.POSITION_PHRASES.values() for w in options]
    texts += [w for options in sw.TEXTURE_PHRASES.values() for w in options]
    texts += [re.sub(r"\{\w+\}", " ", t) for t in sw.TEMPLATES_ONE + sw.TEMPLATES_MANY]
    texts += list(sw.NUMBER_WORDS.values())
    texts += ["a an and , shape", DESCRIBE_PROMPT.format(image=""), "is there a any yes no"]
    words = sorted({w for text in texts for w in split_words(text)})
    return list(SPECIALS) + words


def build_tokenizer(words: Sequence[str] | None = None) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (default :func:`word_list`), offline.

    It prepends ``<s>``, maps unknown words to ``<unk>``, pads with ``<pad>``
    and knows ``<image>`` as the processor's image token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(words or word_list())
    if tuple(words[: len(SPECIALS)]) != SPECIALS:
        raise ValueError(f"the word list must start with {SPECIALS}")
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer: Any, image_size: int, patch_size: int) -> Any:
    """The ``LlavaProcessor`` of shapes-llava: CLIP image processing at ``image_size`` + the word tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=list(MEAN), image_std=list(STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="full", num_additional_image_tokens=1, image_token="<image>")


def build_model(cfg: ShapesLlavaConfig, vocab_size: int, image_size: int) -> Any:
    """A randomly initialised ``LlavaForConditionalGeneration`` of the configured size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if image_size % cfg.patch_size:
        raise VlsaeError(f"patch_size {cfg.patch_size} does not divide the image size {image_size}")
    n_image_tokens = (image_size // cfg.patch_size) ** 2 + 1  # the patches and the class token
    vision = CLIPVisionConfig(image_size=image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                              intermediate_size=cfg.vision_width * cfg.mlp_ratio, num_hidden_layers=cfg.vision_layers,
                              num_attention_heads=cfg.heads)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.text_width * cfg.mlp_ratio,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                       tie_word_embeddings=cfg.tie_embeddings)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=n_image_tokens,
                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                         tie_word_embeddings=cfg.tie_embeddings)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    return model


def normalise(images: Tensor) -> Tensor:
    """uint8 (n, 3, H, W) -> the pixel values the saved CLIP image processor gives for same-size images."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std

