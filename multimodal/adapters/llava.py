"""LLaVA adapters: decoder hidden states at the image tokens and at the caption's tokens.

``llava:PATH`` loads a transformers ``LlavaForConditionalGeneration`` and its
processor with ``from_pretrained`` from a local folder (``save_pretrained``
output: ``config.json``, ``*.safetensors``, processor and tokenizer files) or a
Hugging Face hub id already in the local cache (``HF_HUB_OFFLINE`` is
respected: offline, nothing is fetched). Weights load from safetensors only
and no remote code is run. ``shapes-llava`` is the embedded small LLaVA of the
zoo (from the cache, else the shipped copy, else trained on first use).

The VL-SAE recipe for a vision-language decoder: one forward pass per pair
over ``<image tokens> + prompt holding the caption``; the image modality is
the hidden state at the image-token positions (``input_ids == image_token_id``),
the text modality the hidden state at the caption's own tokens. The prompt is
a template with ``{image}`` and ``{caption}`` (option ``prompt=``; default: the
folder's ``vlsae_prompts.json`` when it has one, as the zoo model does, else
``"{image}\\n{caption}"``). Caption tokens are found from the fast tokenizer's
character offsets, so any tokenizer works, whatever it does to the prompt.

Hook points (``vlsae extract --list-hooks``):

======================  ========  ==========================================================
point                   gives     what
======================  ========  ==========================================================
``layers.N``            both      output of decoder layer N (0-based)
``final``               both      the decoder's final norm (what the LM head reads)
``projector``           image     the projector's output: the image tokens the decoder takes in
``vision.layers.N``     image     output of vision-tower layer N (class token first for CLIP)
======================  ========  ==========================================================

Token modes (``tokens=``), decoder points (``layers.N``, ``final``):

=========  =================================================  =========================================
mode       image rows per pair                                text rows per pair
=========  =================================================  =========================================
``patch``  every image token                                  every caption token
``all``    every image token                                  every text token: start token, prompt
                                                              words and caption (no padding)
``mean``   1: mean over the image tokens                      1: mean over the caption tokens
``cls``    1: the last image token (in a causal decoder the   1: the last caption token (the one that
           one that has attended to the whole image)          has read the whole caption)
=========  =================================================  =========================================

``projector`` and ``vision.layers.N`` follow the open_clip adapter: ``cls`` the
class token, ``patch`` the patches, ``all`` both, ``mean`` the patch mean (a
projector without a class token, LLaVA's ``default`` strategy, has no ``cls``).
Combine one point per modality with a comma: ``vision.layers.1,layers.2``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal.adapters import register_adapter
from multimodal.adapters.base import Adapter, BlockCapture, Extracted, Prepared, pair_fields, select_tokens, to_rgb
from multimodal.quiet import quiet_transformers
from multimodal.zoo import load_model

DEFAULT_PROMPT = "{image}\n{caption}"
PROMPTS_FILE = "vlsae_prompts.json"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def check_prompt(prompt: str) -> str:
    """A prompt template must hold ``{image}`` and ``{caption}`` once each (``{{``/``}}`` for braces)."""
    fields = re.findall(r"(?<!\{)\{(\w*)\}(?!\})", prompt)
    if sorted(fields) != ["caption", "image"]:
        raise VlsaeError(f"LLaVA prompt '{prompt}' must hold {{image}} and {{caption}} once each and no other "
                         f"{{field}}, e.g. '{DEFAULT_PROMPT}'")
    return prompt


def load_llava(source: str, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[Any, Any, str | None]:
    """(model in eval mode, processor, the folder's prompt template or None) for a folder or a cached hub id.

    Every way loading can fail for a user reason becomes a one-line VlsaeError.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    source = str(source).strip()
    if not source:
        raise VlsaeError("llava spec needs a checkpoint: llava:/path/to/folder (save_pretrained output) or llava:ORG/NAME")
    folder = Path(source).expanduser()
    local = folder.is_dir()
    if not local and (source.startswith((".", "/", "~")) or not _HUB_ID.match(source)):
        raise VlsaeError(f"LLaVA folder not found: {source}; pass llava:/path/to/folder holding config.json, "
                         f"model.safetensors and the processor files (save_pretrained output)")
    where = str(folder) if local else source
    offline = _offline()
    not_found = (f"LLaVA checkpoint '{source}' not found locally{' (HF_HUB_OFFLINE is set)' if offline else ''}; "
                 f"pass llava:/path/to/folder holding config.json, model.safetensors and the processor files "
                 f"(save_pretrained output), or download {source} once where the hub is reachable")
    if local and not (folder / "config.json").is_file():
        raise VlsaeError(f"{folder} has no config.json; pass a folder written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=offline or local)
    except (OSError, ValueError) as exc:
        if local:
            raise VlsaeError(f"could not read the config of {folder}: {_first_line(exc)}") from None
        raise VlsaeError(not_found) from None
    if getattr(config, "model_type", None) != "llava":
        raise VlsaeError(f"{source} is a '{getattr(config, 'model_type', '?')}' checkpoint, not a LLaVA "
                         f"(LlavaForConditionalGeneration); use the adapter of that model family")
    try:
        with quiet_transformers():
            model = LlavaForConditionalGeneration.from_pretrained(where, config=config, dtype=dtype,
                                                                  use_safetensors=True, local_files_only=offline or local)
    except OSError as exc:
        if local:
            raise VlsaeError(f"no safetensors weights for LLaVA in {folder} ({_first_line(exc)}); vlsae loads "
                             f"safetensors only: re-save the model with save_pretrained") from None
        raise VlsaeError(not_found) from None
    try:
        processor = AutoProcessor.from_pretrained(where, local_files_only=offline or local)
    except (OSError, ValueError, TypeError) as exc:
        raise VlsaeError(f"the processor of {source} could not be loaded ({_first_line(exc)}); save it next to the "
                         f"model with processor.save_pretrained") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise VlsaeError(f"{source} has no LLaVA processor (image processor + tokenizer); save one with "
                         f"LlavaProcessor.save_pretrained into the model folder")
    prompt = None
    if local and (folder / PROMPTS_FILE).is_file():
        prompt = json.loads((folder / PROMPTS_FILE).read_text()).get("prompt")
    return model.to(device).eval(), processor, prompt


def _last_position(mask: Tensor) -> Tensor:
    """(batch,) index of the last True of each row of a (batch, seq) mask (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).max(dim=1).values


@register_adapter("llava")
class LlavaAdapter(Adapter):
    usage = "llava:FOLDER|ORG/NAME"
    summary = "a transformers LLaVA: decoder-layer hidden states at the image tokens and the caption's tokens"
    modalities = ("image", "text")

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype,
                 prompt: str | None = None, source: str = ""):
        super().__init__(device, dtype)
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise VlsaeError(f"{source or 'this LLaVA'} has a slow tokenizer; the caption tokens are found from a fast "
                             f"tokenizer's offsets: save the processor with a tokenizer.json")
        self.prompt = check_prompt(prompt or DEFAULT_PROMPT)
        self.source = source
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        llava = model.model
        self._decoder = llava.language_model
        vision = llava.vision_tower
        inner = getattr(vision, "vision_model", vision)  # CLIPVisionModel keeps its parts on itself or on .vision_model
        self._vision_layers = list(inner.encoder.layers)
        self._vision_cls = getattr(inner.embeddings, "class_embedding", None) is not None
        self._projector = llava.multi_modal_projector
        # LLaVA's "full" strategy keeps the vision class token as the first image token
        self._projects_cls = self._vision_cls and getattr(config, "vision_feature_select_strategy", "default") == "full"
        self._n_image_tokens = self._count_image_tokens()

    @classmethod
    def from_spec(cls, rest: str, device: torch.device, dtype: torch.dtype, **options: Any) -> "LlavaAdapter":
        prompt = options.pop("prompt", None)
        if options:
            raise VlsaeError(f"llava adapter takes only the option prompt=, got {', '.join(options)}")
        model, processor, folder_prompt = load_llava(rest, device=device, dtype=dtype)
        return cls(model, processor, device, dtype, prompt=prompt or folder_prompt, source=rest)

    # -- hook points --------------------------------------------------------------------
    def hook_points(self) -> list[str]:
        points = [f"layers.{i}" for i in range(len(self._decoder.layers))] + ["final", "projector"]
        return points + [f"vision.layers.{i}" for i in range(len(self._vision_layers))]

    def hook_modalities(self, point: str) -> tuple[str, ...]:
        return ("image",) if point == "projector" or point.startswith("vision.") else ("image", "text")

    def parse_hook(self, hook: str) -> dict[str, str]:
        """As the base class, except that a decoder point next to an image-only point gives the text
        modality only: ``vision.layers.1,layers.2`` is image from the vision tower, text from layer 2."""
        points = [p.strip() for p in str(hook).split(",") if p.strip()]
        image_only = [p for p in points if p in self.hook_points() and self.hook_modalities(p) == ("image",)]
        decoder = [p for p in points if p not in image_only]
        if len(image_only) != 1 or len(decoder) != 1:
            return super().parse_hook(hook)
        super().parse_hook(decoder[0])  # validates the name
        return {"image": image_only[0], "text": decoder[0]}

    def widths(self, hook: str) -> dict[str, int]:
        config = self.model.config
        out = {}
        for modality, point in self.parse_hook(hook).items():
            out[modality] = int(config.vision_config.hidden_size if point.startswith("vision.")
                                else config.text_config.hidden_size)
        return out

    def _order(self, point: str) -> int:
        """Execution order of a hook point in one forward pass (vision tower, projector, decoder)."""
        n_vision = len(self._vision_layers)
        if point.startswith("vision.layers."):
            return int(point.rsplit(".", 1)[1])
        if point == "projector":
            return n_vision
        if point == "final":
            return n_vision + 1 + len(self._decoder.layers)
        return n_vision + 1 + int(point.rsplit(".", 1)[1])

    def _module(self, point: str) -> torch.nn.Module:
        if point.startswith("vision.layers."):
            return self._vision_layers[int(point.rsplit(".", 1)[1])]
        if point == "projector":
            return self._projector
        if point == "final":
            return self._decoder.norm
        return self._decoder.layers[int(point.rsplit(".", 1)[1])]

    # -- inputs ---------------------------------------------------------------------------
    def _pixel_values(self, images: Sequence[Any]) -> Tensor:
        return self.processor.image_processor([to_rgb(image) for image in images], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def _count_image_tokens(self) -> int:
        """Image tokens per image: what the model's own image features give for one processed image."""
        from PIL import Image

        size = getattr(self.processor.image_processor, "crop_size", None) or {}
        side = int(size.get("height", getattr(self.model.config.vision_config, "image_size", 224)))
        pixels = self._pixel_values([Image.new("RGB", (side, side))]).to(self.device, self.model.dtype)
        features = self.model.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        return int(features[0].shape[0] if isinstance(features, (list, tuple)) else features.shape[1])

    def prepare(self, pairs: Sequence[Any], modalities: Sequence[str] | None = None) -> Prepared:
        """Pixel values, the tokenised prompts (image tokens expanded) and the caption-token mask."""
        wanted = set(modalities or self.modalities)
        fields = [pair_fields(p) for p in pairs]
        keys = [str(k) for k, _, _ in fields]
        captions = []
        for key, _, caption in fields:
            if caption is None or not str(caption).strip():
                if "text" in wanted:
                    raise VlsaeError(f"pair '{key}' has no caption; text activations need the txt field of every record")
                caption = ""
            captions.append(str(caption).strip())
        pixels = self._pixel_values([image for _, image, _ in fields])
        head, tail = self.prompt.split("{caption}")
        head = head.replace("{image}", self.image_token * self._n_image_tokens).replace("{{", "{").replace("}}", "}")
        tail = tail.replace("{image}", self.image_token * self._n_image_tokens).replace("{{", "{").replace("}}", "}")
        texts = [head + caption + tail for caption in captions]
        encoded = self.tokenizer(texts, return_offsets_mapping=True, padding=True, padding_side="right",
                                 return_tensors="pt")
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        start = torch.full((len(texts), 1), len(head))
        end = start + torch.tensor([len(c) for c in captions]).unsqueeze(1)
        is_image = ids == self.image_token_id
        caption_mask = (offsets[..., 1] > offsets[..., 0]) & (offsets[..., 0] < end) & (offsets[..., 1] > start)
        caption_mask &= encoded["attention_mask"].bool() & ~is_image
        counts = is_image.sum(dim=1)
        if (counts != self._n_image_tokens).any():
            raise VlsaeError(f"the prompt '{self.prompt}' tokenised to {int(counts[0])} image tokens, the model takes "
                             f"{self._n_image_tokens}; the image token must stay one token")
        if "text" in wanted and not caption_mask.any(dim=1).all():
            raise VlsaeError("a caption tokenised to no tokens inside the prompt; check the prompt template")
        return Prepared(keys=keys, inputs={"pixel_values": pixels, "input_ids": ids,
                                           "attention_mask": encoded["attention_mask"], "caption_mask": caption_mask})

    # -- running ----------------------------------------------------------------------------
    def forward(self, prepared: Prepared, hook: str, tokens: str) -> Extracted:
        return self.forward_hooks(prepared, [hook], tokens)[hook]

    def forward_hooks(self, prepared: Prepared, hooks: Sequence[str], tokens: str) -> dict[str, Extracted]:
        """Every hook's activations from one forward of the model: the modules of all hooks captured together
        (it stops after the deepest), as sparsify trains many layers from one pass."""
        tokens = self.check_tokens(tokens)
        wanted = {hook: self.parse_hook(hook) for hook in hooks}
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in prepared.inputs.items()}
        pixels = inputs["pixel_values"].to(self.model.dtype)
        blocks = {self._order(p): self._module(p) for points in wanted.values() for p in points.values()}
        with torch.no_grad(), self.autocast(), BlockCapture(blocks) as capture:
            capture.run(lambda: self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                           pixel_values=pixels, use_cache=False))
        out: dict[str, Extracted] = {}
        for hook, points in wanted.items():
            acts: dict[str, Tensor] = {}
            index: dict[str, Tensor] = {}
            for modality, point in points.items():
                hidden = capture.outputs[self._order(point)]
                acts[modality], index[modality] = self._select(hidden, modality, point, tokens, inputs)
            out[hook] = self._finish(prepared.keys, acts, index)
        return out

    def _select(self, hidden: Tensor, modality: str, point: str, tokens: str, inputs: dict[str, Tensor]
                ) -> tuple[Tensor, Tensor]:
        batch, seq = hidden.shape[:2]
        if point.startswith("vision."):
            positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
            prefix = 1 if self._vision_cls else 0
            cls_pos = torch.zeros(batch, dtype=torch.long, device=hidden.device) if self._vision_cls else None
            return select_tokens(hidden, tokens, cls_pos, positions >= prefix, torch.ones_like(positions, dtype=torch.bool))
        if point == "projector":
            every = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
            if not self._projects_cls:
                if tokens == "cls":
                    raise VlsaeError("this LLaVA's projected image tokens hold no class token; use --tokens mean, patch "
                                     "or all (or a vision.layers.N hook for the class token)")
                return select_tokens(hidden, tokens, None, every, every)
            patches = every.clone()
            patches[:, 0] = False
            return select_tokens(hidden, tokens, torch.zeros(batch, dtype=torch.long, device=hidden.device), patches, every)
        is_image = inputs["input_ids"] == self.image_token_id
        if modality == "image":
            return select_tokens(hidden, tokens, _last_position(is_image), is_image, is_image)
        caption = inputs["caption_mask"]
        text = inputs["attention_mask"].bool() & ~is_image
        return select_tokens(hidden, tokens, _last_position(caption), caption, text)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": self.source, "prompt": self.prompt,
                "image_tokens": self._n_image_tokens}


@register_adapter("shapes-llava")
class ShapesLlavaAdapter(LlavaAdapter):
    usage = "shapes-llava"
    summary = "the embedded small LLaVA trained on ShapesWorld (trained on first use, then cached)"

    @classmethod
    def from_spec(cls, rest: str, device: torch.device, dtype: torch.dtype, **options: Any) -> "ShapesLlavaAdapter":
        if rest:
            raise VlsaeError("shapes-llava takes no arguments; for another checkpoint use llava:FOLDER")
        prompt = options.pop("prompt", None)

        loaded = load_model("shapes-llava", device=device, **options)
        return cls(loaded.model, loaded.processor, device, dtype, prompt=prompt or loaded.prompt, source=str(loaded.path))
