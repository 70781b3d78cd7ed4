"""Text encoders of diffusers text-to-image pipelines: per-token text activations.

Spec: ``diffusers-text:PATH_OR_REPO`` and the embedded ``shapes-diffusion``.

- PATH: a pipeline folder in diffusers' ``save_pretrained`` layout
  (``model_index.json``, ``text_encoder/``, ``tokenizer/``, ...).
- REPO: a Hugging Face repo id (``stabilityai/stable-diffusion-xl-base-1.0``);
  only ``model_index.json``, the text encoders' safetensors and the tokenizers
  are read, from the local Hugging Face cache when ``HF_HUB_OFFLINE=1`` (a
  missing one is a one-line error saying what to pass).

Only the text encoders and tokenizers are loaded, never the UNet or the
autoencoder; the activations are those the pipeline computes for a prompt.
Stable Diffusion 1.x/2.x have one encoder (``text_encoder``), SDXL two
(``text_encoder`` and ``text_encoder_2``); both kinds are transformers CLIP
text models (``CLIPTextModel``, ``CLIPTextModelWithProjection``).

The adapter yields the ``text`` modality only (the captions of the pairs; their
images are never read). Hook points, for each encoder ENC:

- ``ENC.embeddings``: token + position embeddings (the input of block 0);
- ``ENC.blocks.N``: the output of transformer block N;
- ``ENC.final``: the last block after the final layer norm;
- ``ENC.projection``: (encoders with a projection, SDXL's second) the projected
  pooled embedding, one row per caption;
- ``final``: what the UNet cross-attends to, the pipeline's ``prompt_embeds``:
  SD 1.x/2.x ``text_encoder.final``; SDXL the second-to-last block of each
  encoder, concatenated along the width.

Token modes (per caption): ``cls`` the pooled end-of-text token, ``patch`` the
word tokens, ``all`` start + words + end (no padding), ``mean`` the mean over
the word tokens. Captions are truncated to the tokenizer's length (77 for SD).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal.adapters import register_adapter
from multimodal.adapters.base import Adapter, BlockCapture, Extracted, Prepared, pair_fields, select_tokens
from multimodal.zoo import load_model, model_dir

ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
SUPPORTED = ("CLIPTextModel", "CLIPTextModelWithProjection")
# what a hub download of a pipeline needs for its text side: no UNet, no autoencoder, no pickles
TEXT_FILES = ["model_index.json", "text_encoder*/config.json", "text_encoder*/*.safetensors",
              "text_encoder*/*.safetensors.index.json", "tokenizer*/*"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def resolve_pipeline(rest: str) -> Path:
    """The local folder of a pipeline spec: the folder itself, or the HF cache snapshot of a repo id."""
    rest = rest.strip()
    if not rest:
        raise VlsaeError("diffusers-text needs a pipeline: diffusers-text:/path/to/pipeline or diffusers-text:ORG/REPO")
    path = Path(rest).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise VlsaeError(f"{path} has no model_index.json; pass a diffusers pipeline folder "
                             f"(the layout save_pretrained writes)")
        return path
    if path.exists() or rest.startswith((".", "/", "~")) or rest.count("/") != 1:
        raise VlsaeError(f"diffusers pipeline folder not found: {rest}; pass diffusers-text:/path/to/pipeline "
                         f"or a Hugging Face repo id such as ORG/REPO")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(rest, allow_patterns=TEXT_FILES))
    except Exception as exc:  # huggingface_hub raises many types (offline, not found, gated, invalid id, partial)
        offline = " (HF_HUB_OFFLINE is set)" if _offline() else f": {_first_line(exc)}"
        raise VlsaeError(f"weights for diffusers pipeline '{rest}' not found locally{offline}; download them once "
                         f"where the hub is reachable, or pass a folder: diffusers-text:/path/to/pipeline") from None


@dataclass
class TextEncoder:
    """One text encoder of a pipeline with its tokenizer.

    ``core`` holds ``embeddings``, ``encoder.layers`` and ``final_layer_norm``
    (the model itself for ``CLIPTextModel`` in transformers 5, ``.text_model``
    for ``CLIPTextModelWithProjection``).
    """

    name: str
    model: Any
    tokenizer: Any

    @property
    def core(self) -> Any:
        return getattr(self.model, "text_model", self.model)

    @property
    def layers(self) -> list[Any]:
        return list(self.core.encoder.layers)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def projection_dim(self) -> int | None:
        return int(self.model.config.projection_dim) if hasattr(self.model, "text_projection") else None

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """input_ids (and attention_mask) padded to the longest caption, truncated to the model length.

        With CLIP's causal attention, the tokens up to the end token are the same
        as under the pipeline's padding to ``model_max_length``.
        """
        encoded = self.tokenizer(list(texts), padding="longest", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
        return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}

    def run(self, inputs: dict[str, Tensor]) -> Any:
        """The model's forward as the pipeline calls it (an attention mask only if the config asks for one)."""
        mask = inputs["attention_mask"] if getattr(self.model.config, "use_attention_mask", False) else None
        return self.model(inputs["input_ids"], attention_mask=mask)


def load_text_encoders(folder: Path, device: torch.device) -> list[TextEncoder]:
    """The pipeline's CLIP text encoders and tokenizers (safetensors only), in eval mode on ``device``."""
    import transformers

    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise VlsaeError(f"could not read {index_path}: {_first_line(exc)}") from None
    encoders = []
    for name in ENCODERS:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        library, class_name = entry
        if library != "transformers" or class_name not in SUPPORTED:
            raise VlsaeError(f"{folder}: {name} is a {library}.{class_name}; diffusers-text reads CLIP text encoders "
                             f"({', '.join(SUPPORTED)}) as in Stable Diffusion 1.x/2.x and SDXL")
        if not (folder / name / "config.json").is_file():
            raise VlsaeError(f"{folder / name} is missing (config.json); the pipeline folder is incomplete")
        tokenizer_name = TOKENIZERS[name]
        if not (folder / tokenizer_name).is_dir():
            raise VlsaeError(f"{folder / tokenizer_name} is missing; the pipeline's tokenizer is needed "
                             f"to tokenise captions")
        try:
            model = getattr(transformers, class_name).from_pretrained(str(folder), subfolder=name, use_safetensors=True,
                                                                      local_files_only=True)
        except (OSError, ValueError) as exc:
            raise VlsaeError(f"could not load {folder / name}: {_first_line(exc)} "
                             f"(vlsae reads safetensors weights only)") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), subfolder=tokenizer_name,
                                                                   local_files_only=True)
        except (OSError, ValueError) as exc:
            raise VlsaeError(f"could not load the tokenizer {folder / tokenizer_name}: {_first_line(exc)}") from None
        encoders.append(TextEncoder(name=name, model=model.to(device).eval(), tokenizer=tokenizer))
    if not encoders:
        raise VlsaeError(f"{folder} has no text encoder (model_index.json lists none of {', '.join(ENCODERS)})")
    return encoders


def end_positions(ids: Tensor, eos_id: int | None) -> Tensor:
    """(batch,) position of the first end-of-text token (the token CLIP pools); the last id when none."""
    if eos_id is None:
        return ids.argmax(dim=-1)
    is_end = ids == eos_id
    last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    return torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), last)


@register_adapter("diffusers-text")
class DiffusersTextAdapter(Adapter):
    usage = "diffusers-text:PIPELINE_FOLDER|ORG/REPO"
    summary = "the text encoder(s) of a diffusers text-to-image pipeline (SD 1.x/2.x, SDXL): per-token text activations"
    modalities = ("text",)
    default_hook = "final"

    def __init__(self, encoders: list[TextEncoder], device: torch.device, dtype: torch.dtype, source: str = "",
                 penultimate_prompt: bool | None = None):
        super().__init__(device, dtype)
        self.encoders = {e.name: e for e in encoders}
        self.source = source
        # SDXL feeds the UNet the second-to-last block of each encoder; SD 1.x/2.x the final normed block
        if penultimate_prompt is None:
            penultimate_prompt = "text_encoder_2" in self.encoders
        self.penultimate_prompt = penultimate_prompt

    @classmethod
    def from_spec(cls, rest: str, device: torch.device, dtype: torch.dtype, **options: Any) -> "DiffusersTextAdapter":
        if options:
            raise VlsaeError(f"diffusers-text adapter takes no options, got {', '.join(options)}")
        folder = resolve_pipeline(rest)
        return cls(load_text_encoders(folder, device), device, dtype, source=str(folder))

    @classmethod
    def from_pipeline(cls, pipe: Any, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                      ) -> "DiffusersTextAdapter":
        """An adapter on a loaded pipeline's own text encoder(s): hooks read (and steering edits) the
        modules the pipeline runs."""
        encoders = [TextEncoder(name=name, model=getattr(pipe, name), tokenizer=getattr(pipe, TOKENIZERS[name]))
                    for name in ENCODERS if getattr(pipe, name, None) is not None]
        if not encoders:
            raise VlsaeError(f"{type(pipe).__name__} has no text encoder")
        device = device or encoders[0].model.device
        return cls(encoders, torch.device(device), dtype, source=type(pipe).__name__)

    # -- hook points ----------------------------------------------------------
    def hook_points(self) -> list[str]:
        points = ["final"]
        for name, encoder in self.encoders.items():
            points += [f"{name}.embeddings"] + [f"{name}.blocks.{i}" for i in range(len(encoder.layers))]
            points.append(f"{name}.final")
            if encoder.projection_dim is not None:
                points.append(f"{name}.projection")
        return points

    def hook_modalities(self, point: str) -> tuple[str, ...]:
        return ("text",)

    def widths(self, hook: str) -> dict[str, int]:
        point = self.parse_hook(hook)["text"]
        if point == "final":
            return {"text": sum(e.width for e in self.encoders.values()) if self.penultimate_prompt
                    else self.encoders["text_encoder"].width}
        name, _, what = point.partition(".")
        encoder = self.encoders[name]
        return {"text": encoder.projection_dim if what == "projection" else encoder.width}

    def hook_module(self, point: str) -> Any:
        """The module whose output is a per-encoder hook point (for steering hooks); not for ``final``
        (edit ``prompt_embeds`` instead) or ``projection``."""
        self.parse_hook(point)
        name, _, what = point.partition(".")
        if name not in self.encoders or what == "projection":
            raise VlsaeError(f"hook point '{point}' is not one module's output; "
                             f"use ENC.embeddings, ENC.blocks.N or ENC.final")
        core = self.encoders[name].core
        if what == "embeddings":
            return core.embeddings
        if what == "final":
            return core.final_layer_norm
        return core.encoder.layers[int(what.rsplit(".", 1)[1])]

    # -- running --------------------------------------------------------------
    def prepare(self, pairs: Sequence[Any], modalities: Sequence[str] | None = None) -> Prepared:
        fields = [pair_fields(p) for p in pairs]
        captions = [c for _, _, c in fields]
        if any(c is None for c in captions):
            raise VlsaeError("a pair has no caption; text activations need the txt field of every record")
        texts = [str(c) for c in captions]
        tokens = {name: encoder.tokenize(texts) for name, encoder in self.encoders.items()}
        first = next(iter(tokens.values()))
        return Prepared(keys=[str(k) for k, _, _ in fields], inputs={"text": first["input_ids"]},
                        extra={"tokens": tokens})

    def forward(self, prepared: Prepared, hook: str, tokens: str) -> Extracted:
        tokens = self.check_tokens(tokens)
        point = self.parse_hook(hook)["text"]
        if "tokens" not in prepared.extra:
            raise VlsaeError(f"batch was prepared without text inputs for hook '{hook}'")
        inputs = {name: {k: v.to(self.device) for k, v in t.items()} for name, t in prepared.extra["tokens"].items()}
        with torch.no_grad(), self.autocast():
            if point == "final":
                hidden, name = self._prompt_embeds(inputs), next(iter(self.encoders))
            else:
                name, _, what = point.partition(".")
                if what == "projection":
                    if tokens != "cls":
                        raise VlsaeError(f"hook '{point}' gives one embedding per caption; use --tokens cls")
                    out = self.encoders[name].run(inputs[name]).text_embeds
                    return self._finish(prepared.keys, {"text": out}, {"text": torch.arange(out.shape[0])})
                hidden = self._capture(name, self.hook_module(point), inputs[name])
            ids = inputs[name]["input_ids"]
            rows, index = self._select(hidden, ids, self.encoders[name].tokenizer.eos_token_id, tokens)
        return self._finish(prepared.keys, {"text": rows}, {"text": index})

    def _capture(self, name: str, module: Any, inputs: dict[str, Tensor]) -> Tensor:
        with BlockCapture({0: module}) as capture:
            capture.run(lambda: self.encoders[name].run(inputs))
        return capture.outputs[0]

    def _prompt_embeds(self, inputs: dict[str, dict[str, Tensor]]) -> Tensor:
        """(batch, seq, width): what the pipeline passes to the UNet for these captions (up to padding)."""
        if not self.penultimate_prompt:
            encoder = self.encoders["text_encoder"]
            return self._capture(encoder.name, encoder.core.final_layer_norm, inputs[encoder.name])
        parts = []
        for name, encoder in self.encoders.items():
            layers = encoder.layers
            if len(layers) < 2:
                raise VlsaeError(f"{name} has {len(layers)} block(s); SDXL-style prompt embeddings need two or more")
            parts.append(self._capture(name, layers[-2], inputs[name]))
        if len({p.shape[1] for p in parts}) != 1:
            raise VlsaeError("the pipeline's tokenizers split a caption into different lengths; "
                             "use one encoder's hooks")
        return torch.cat(parts, dim=-1)

    @staticmethod
    def _select(hidden: Tensor, ids: Tensor, eos_id: int | None, tokens: str) -> tuple[Tensor, Tensor]:
        batch, seq, _ = hidden.shape
        end = end_positions(ids, eos_id)
        positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
        all_mask = positions <= end.unsqueeze(1)
        patch_mask = all_mask & (positions > 0) & (positions < end.unsqueeze(1))
        return select_tokens(hidden, tokens, end, patch_mask, all_mask)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pipeline": self.source, "encoders": list(self.encoders),
                "prompt_embeds": ("penultimate blocks, concatenated" if self.penultimate_prompt
                                  else "text_encoder.final")}


@register_adapter("shapes-diffusion")
class ShapesDiffusionAdapter(DiffusersTextAdapter):
    usage = "shapes-diffusion"
    summary = "the text encoder of the embedded small diffusion pipeline trained on ShapesWorld (trained on first use)"

    @classmethod
    def from_spec(cls, rest: str, device: torch.device, dtype: torch.dtype, **options: Any) -> "ShapesDiffusionAdapter":
        if rest:
            raise VlsaeError("shapes-diffusion takes no arguments; for another pipeline use diffusers-text:FOLDER")

        folder = options.pop("folder", None)
        if options:
            raise VlsaeError(f"shapes-diffusion adapter takes no options but folder, got {', '.join(options)}")
        pipe = load_model("shapes-diffusion", device=device, folder=folder)
        adapter = cls.from_pipeline(pipe, device=device, dtype=dtype)
        adapter.source = str(folder or model_dir("shapes-diffusion"))
        adapter.pipe = pipe
        return adapter
