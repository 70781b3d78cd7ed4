"""shapes-llava's name, files, prompts, special tokens and training settings.

One definition of the token ids, prompts and held-out index ranges that the
tokenizer, the training recipe, the evaluation and a saved folder's
``vlsae_prompts.json`` all have to agree on.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlsae.config import option

NAME = "shapes-llava"
PROMPTS_FILE = "vlsae_prompts.json"  # read by the llava adapter: how a caption is put into the prompt
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (the saved image processor's)
STD = (0.26862954, 0.26130258, 0.27577711)
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = range(len(SPECIALS))
DESCRIBE_PROMPT = "{image} describe :"
CAPTION_PROMPT = "{image} describe : {caption}"  # the describe prompt holding its answer: the VL-SAE input
EVAL_OFFSET = 10_000_000  # held-out pairs are ShapesWorld indices from here on
MULTI_EVAL_OFFSET = 11_000_000  # held-out 1-3-object scenes (caption recall, yes/no)
# Captions that name every attribute of every object: "describe" then has one complete answer.
TRAIN_WORLD = {"mention_colour": 1.0, "mention_size": 1.0, "mention_position": 1.0}
CAPTION_ATTRIBUTES = ("shape", "colour", "size", "position")
QUESTION_TYPES = ("colour_shape", "shape", "colour")


@dataclass
class ShapesLlavaConfig:
    """Training settings of shapes-llava (``vlsae zoo train shapes-llava --set key=value``)."""

    seed: int = option(0, help="seed of the model init, the batch order and the questions (the pairs' seed is world.seed)")
    steps: int = option(2000, help="optimizer steps (each: one describe batch and one yes/no batch; 700 named the shape 16 %)")
    describe_batch: int = option(32, help="images per step trained to be described")
    question_batch: int = option(32, help="images per step asked a yes/no question")
    vision_steps: int = option(3000, help="steps of stage 1, the vision/word alignment (0: train end to end from scratch)")
    vision_batch: int = option(64, help="images per stage-1 step")
    vision_lr: float = option(3e-3, help="peak AdamW learning rate of stage 1 (linear warm-up, cosine decay)")
    lr: float = option(2e-3, help="peak AdamW learning rate of stage 2 (linear warm-up, cosine decay)")
    warmup: int = option(50, help="warm-up steps")
    weight_decay: float = option(0.05, help="AdamW weight decay on matrices")
    n_train: int = option(10_000, help="distinct ShapesWorld pairs rendered for training")
    n_eval: int = option(300, help="held-out scenes for each evaluation (captions of single-object scenes, "
                                   "captions of 1-3-object scenes, yes/no questions)")
    patch_size: int = option(16, help="vision patch size (64x64 images: 16 image tokens at 16)")
    vision_width: int = option(96, help="CLIP vision tower width")
    vision_layers: int = option(2, help="CLIP vision tower layers")
    text_width: int = option(128, help="Llama decoder width")
    text_layers: int = option(3, help="Llama decoder layers")
    heads: int = option(4, help="attention heads in both towers")
    mlp_ratio: int = option(2, help="MLP width / model width in both towers")
    tie_embeddings: bool = option(True, help="share the decoder's input and output word embeddings")
    max_new_tokens: int = option(48, help="longest generated caption in the evaluation (tokens)")
    world: dict = option(None, factory=lambda: dict(TRAIN_WORLD),
                         help="ShapesWorldConfig overrides for the training pairs (default: captions name every attribute)")
    threads: int = option(0, help="torch CPU threads while training (0: leave torch's setting)")


def prompts_record() -> dict[str, str]:
    """What ``vlsae_prompts.json`` holds: ``prompt`` (how the llava adapter puts a caption after the
    image) and the two training prompts, with ``{image}`` for the image token."""
    return {"prompt": CAPTION_PROMPT, "describe": DESCRIBE_PROMPT, "question": "{image} {question}"}
