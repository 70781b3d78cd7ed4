"""``shapes-llava``: a small transformers LLaVA trained to caption ShapesWorld and answer yes/no questions.

The model is a real ``transformers.LlavaForConditionalGeneration``: a small
CLIP vision tower (64x64 images, 16x16 patches), LLaVA's two-layer projector
and a small Llama decoder with tied word embeddings. Its 17 image tokens are
the class token and the 16 patches (LLaVA's ``full`` feature strategy). The
tokenizer is word-level, built offline with the ``tokenizers`` library from
every word a ShapesWorld caption or question can contain, and wrapped with a
``CLIPImageProcessor`` into a ``LlavaProcessor``; model and processor are saved
with ``save_pretrained``, so the folder loads with ``from_pretrained`` like any
LLaVA checkpoint (and as ``llava:FOLDER``).

Training, two stages:

1. :func:`.recipe.pretrain_vision` stands in for LLaVA's pretrained CLIP and its
   feature-alignment stage: the vision tower, projector and word embeddings
   learn that each patch token names (in the decoder's word space) the colour,
   shape and size of the object its patch sees, and the class token the values
   present in the scene.
2. The whole LLaVA, teacher-forced, loss on the reply tokens only, two tasks per step:

   - describe: ``<image> describe :`` -> a ShapesWorld caption naming every
     object's shape, colour, size and position, objects in reading order
     (:func:`.data.reading_order_caption`);
   - yes/no: ``<image> is there a red circle`` -> ``red circle`` (yes: the reply
     names what was asked) or ``no``, half of each; negatives are often one
     attribute away from an object in the image (see :func:`.data.make_question` for
     why the reply is not the word "yes").

Evaluation on held-out ShapesWorld indices (never rendered for training):
caption attribute accuracy, by greedy generation on single-object scenes
parsed back into attributes (:func:`.data.parse_objects`) and compared with the
planted ones; colour+shape recall and precision of generated captions of
1-3-object scenes; yes/no accuracy on 1-3-object scenes, overall and per
question type: the greedy first reply word must be the asked word for a true
question and "no" for a false one.

The package, by job: :mod:`.config` (settings, prompts, special tokens),
:mod:`.build` (tokenizer, processor, model), :mod:`.data` (captions,
questions, token batches, caption parsing), :mod:`.recipe` (training; only
``vlsae zoo train`` needs it), :mod:`.evaluation`, and here the registered
zoo entry.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlsae.config import from_dict

from multimodal.quiet import quiet_transformers
from multimodal.zoo import REPORT, ZooModel, register_zoo_model, training_world
from multimodal.zoo.shapes_llava.build import build_model, build_processor, build_tokenizer, normalise
from multimodal.zoo.shapes_llava.config import (CAPTION_PROMPT, DESCRIBE_PROMPT, NAME, PROMPTS_FILE, TRAIN_WORLD,
                                                ShapesLlavaConfig)
from multimodal.zoo.shapes_llava.data import make_question, parse_objects
from multimodal.zoo.shapes_llava.evaluation import answer_questions, evaluate, generate_captions
from multimodal.zoo.shapes_llava.recipe import train_shapes_llava


@dataclass
class LoadedLlava:
    """A trained shapes-llava: the transformers model, its processor and the caption prompt."""

    model: Any
    processor: Any
    prompt: str
    path: Path
    report: dict[str, Any] = field(default_factory=dict)


@register_zoo_model(NAME)
class ShapesLlava(ZooModel):
    """The zoo entry: trains with :mod:`.recipe`, loads with transformers, evaluates with :mod:`.evaluation`."""

    summary = "small transformers LLaVA (CLIP vision tower + Llama) trained to caption ShapesWorld and answer yes/no"
    files = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", PROMPTS_FILE)
    config_class = ShapesLlavaConfig

    @classmethod
    def train(cls, out_dir: Path, overrides: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        cfg = from_dict(cls.config_class, overrides, where=f"{NAME} training config")
        return train_shapes_llava(out_dir, cfg, progress=progress)

    @classmethod
    def load(cls, folder: Path, device: Any = "cpu") -> LoadedLlava:
        """The model, processor and caption prompt of a trained (or shipped) folder, in fp32 eval mode."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        folder = cls.require_files(folder)
        # dtype: a shipped copy stores fp16 weights; the model runs in fp32
        with quiet_transformers():
            model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                                  local_files_only=True)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        prompt = json.loads((folder / PROMPTS_FILE).read_text())["prompt"]
        report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).is_file() else {}
        return LoadedLlava(model=model.to(device).eval(), processor=processor, prompt=prompt, path=folder, report=report)

    @classmethod
    def evaluate(cls, folder: Path, device: Any = "cpu") -> dict[str, Any]:
        """The evaluation of training, rerun on ``folder`` with the settings its report recorded."""
        loaded = cls.load(folder, device=device)
        cfg = from_dict(cls.config_class, loaded.report.get("config", {}), where=f"{NAME} training config")
        return evaluate(loaded.model, loaded.processor.tokenizer, training_world(cfg.world, NAME), cfg)

    @classmethod
    def describe_report(cls, report: dict[str, Any]) -> str:
        metrics = report.get("metrics", {})
        lines = ["caption attribute accuracy (greedy captions of held-out single-object scenes):"]
        for attribute, r in metrics.get("caption", {}).items():
            lines.append(f"  {attribute:<10} {r['accuracy']:6.1%}   (named {r['named']:.0%}, chance {r['chance']:.1%}, "
                         f"{r['classes']} classes, n={r['n']})")
        objects = metrics.get("caption_objects")
        if objects:
            lines.append(f"1-3-object captions: colour+shape recall {objects['colour_shape_recall']:.1%}, precision "
                         f"{objects['colour_shape_precision']:.1%}, object count {objects['object_count_accuracy']:.1%} "
                         f"(n={objects['n']})")
        yes_no = metrics.get("yes_no")
        if yes_no:
            kinds = ", ".join(f"{k} {v:.1%}" for k, v in yes_no["by_type"].items())
            lines.append(f"yes/no accuracy {yes_no['accuracy']:.1%} (chance 50%, n={yes_no['n']}; {kinds})")
        for task in ("vision", "describe", "yes_no"):
            if f"final_loss_{task}" in metrics:
                lines.append(f"{task} loss {metrics[f'first_loss_{task}']:.3f} -> {metrics[f'final_loss_{task}']:.3f}")
        return "\n".join(lines)



__all__ = ["NAME", "PROMPTS_FILE", "DESCRIBE_PROMPT", "CAPTION_PROMPT", "TRAIN_WORLD", "ShapesLlavaConfig",
           "LoadedLlava", "ShapesLlava", "build_tokenizer", "build_processor", "build_model", "normalise",
           "make_question", "parse_objects", "train_shapes_llava", "generate_captions", "answer_questions",
           "evaluate"]
