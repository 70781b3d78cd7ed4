"""The zero-shot head: class prompts embedded by a CLIP-style adapter, and how they map to classes.

Zero-shot classification compares an image embedding with text embeddings of
prompts. Two protocols build those prompts, and both are one
:class:`ZeroShotHead`:

- :func:`shapesworld_head`: every single-object description the ShapesWorld
  vocabulary can say (:func:`multimodal.zoo.shapes_clip.object_descriptions`,
  9,240 prompts naming all four attributes). CLIP's softmax over all of them
  gives one probability per description, and an attribute value's probability
  is the mass of the descriptions that name it (the other attributes are
  marginalised out). This is the zoo evaluation's protocol
  (:func:`multimodal.zoo.shapes_clip.zero_shot_accuracy`), the strongest plain
  protocol on ShapesWorld (shapes-clip shape 86 %, where one mean-of-prompts
  embedding per class gets 31 %), so it is the baseline every enhancement is
  measured against.
- :func:`classes_head`: a ``--classes`` file of class names and prompt
  templates; each class is the renormalised mean of its templates' embeddings
  (CLIP's own template ensembling, open_clip's ``build_zero_shot_classifier``),
  one prompt per class.

Text embeddings come through the adapter's ``text.final`` hook (the joint
embedding space, before normalisation) for caption-only records, so the same
code serves any open_clip spec, shapes-clip and shapes-clip-minilm. The
logits are ``logit_scale * (normalised image) @ text.T`` computed in the zoo
evaluation's order and marginalised the same way, so the head reproduces its
accuracy (tests/evals/test_zeroshot_head.py checks it on shapes-clip).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from multimodal.adapters import Adapter
from multimodal.pairs import PairRecord
from multimodal.shapesworld import vocabulary
from multimodal.zoo.shapes_clip import ZERO_SHOT_ATTRIBUTES, object_descriptions
from vlsae.errors import VlsaeError

TEXT_HOOK = "text.final"
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's learned temperature saturates here; used when the model has none
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CLASS_ATTRIBUTE = "class"  # the attribute name of a --classes file that names none


@dataclass
class ZeroShotHead:
    """Text embeddings of class prompts and how they map to classes, for one or more attributes.

    attributes:   e.g. ["shape", "colour", "size", "position"], or ["class"] for a --classes file.
    classes:      attribute -> class names (the index of a name is its class index).
    text:         (n_prompts, d) L2-normalised text embeddings (the adapter's final text embedding).
    prompt_class: attribute -> (n_prompts,) long class index of each prompt (-1: the prompt names no class
                  of that attribute; it still takes part in the softmax).
    logit_scale:  the model's temperature (CLIP's exp(logit_scale); 100 when the model has none).
    prompts:      the prompt texts (one per row of ``text``; for a template ensemble, the first template's).
    raw:          (n_prompts, d) the same embeddings before normalisation (a template ensemble: the mean of
                  its templates' raw embeddings), what an SAE trained on the model's raw embeddings reads.
    """

    attributes: list[str]
    classes: dict[str, list[str]]
    text: Tensor
    prompt_class: dict[str, Tensor]
    logit_scale: float = DEFAULT_LOGIT_SCALE
    prompts: list[str] = field(default_factory=list)
    raw: Tensor | None = None
    _cache: dict[str, list[Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.text.shape[0]
        for attribute in self.attributes:
            if attribute not in self.classes or attribute not in self.prompt_class:
                raise ValueError(f"attribute {attribute!r} needs classes and prompt_class")
            if self.prompt_class[attribute].shape != (n,):
                raise ValueError(f"prompt_class[{attribute!r}] must have shape ({n},)")
        if self.raw is not None and self.raw.shape != self.text.shape:
            raise ValueError(f"raw must have the shape of text, {tuple(self.text.shape)}")

    @property
    def n_prompts(self) -> int:
        return int(self.text.shape[0])

    @property
    def d(self) -> int:
        return int(self.text.shape[1])

    def check_width(self, width: int, what: str = "the image embeddings") -> None:
        """One line when image rows cannot be compared with this head's text rows."""
        if width != self.d:
            raise VlsaeError(f"{what} have width {width} but the zero-shot prompts were embedded at width {self.d}; "
                             f"use the image embeddings of the same model (hook final, modality image)")

    def prompt_logits(self, image: Tensor) -> Tensor:
        """image: (n, d) raw image embeddings -> (n, n_prompts) ``logit_scale * cosine``.

        Computed as ``(scale * normalised image) @ text.T``, the zoo evaluation's order of operations.
        """
        self.check_width(int(image.shape[1]))
        return self.logit_scale * F.normalize(image.float(), dim=-1) @ self.text.T

    def class_log_probs(self, image: Tensor | None, attribute: str, prompt_logits: Tensor | None = None) -> Tensor:
        """(n, n_classes): log of the softmax mass over all prompts summed per class.

        Pass ``prompt_logits`` (n, n_prompts) to marginalise logits computed elsewhere (a
        concept-mixed score); ``image`` is then not used. A class no prompt names gets -inf.
        """
        if prompt_logits is None:
            if image is None:
                raise ValueError("give image or prompt_logits")
            prompt_logits = self.prompt_logits(image)
        log_probs = torch.log_softmax(prompt_logits, dim=1)
        columns = [torch.logsumexp(log_probs.index_select(1, index), dim=1) if index.numel()
                   else log_probs.new_full((log_probs.shape[0],), float("-inf")) for index in self.class_index(attribute)]
        return torch.stack(columns, dim=1)

    def predict(self, image: Tensor | None, attribute: str, prompt_logits: Tensor | None = None) -> Tensor:
        """(n,) long: the most probable class of ``attribute`` (the argmax of :meth:`class_log_probs`)."""
        if prompt_logits is None:
            if image is None:
                raise ValueError("give image or prompt_logits")
            prompt_logits = self.prompt_logits(image)
        return self.predict_all(prompt_logits, [attribute])[attribute]

    def predict_all(self, prompt_logits: Tensor, attributes: Sequence[str] | None = None) -> dict[str, Tensor]:
        """attribute -> (n,) long predictions from (n, n_prompts) logits, every attribute in one pass.

        The argmax of the per-class softmax mass, computed as ``exp(logits - row max) @ one-hot``:
        one exponential and one small matrix product for all attributes, where the log-space
        marginalisation of :meth:`class_log_probs` takes one exponential per attribute and copies
        of every class's columns. Both are the same function of the logits; they can differ only
        where two classes' masses agree to float32 rounding (about 1e-7 relative). Scoring sweeps
        (many λ, many images) use this path.
        """
        attributes = list(attributes or self.attributes)
        onehot, sizes = self._onehot(tuple(attributes))
        # below exp(-80) a prompt's share is < 1e-34 of the best one's: clamping there changes no class's
        # mass in float32, and keeps exp off denormal numbers, which take CPUs twice as long
        shifted = torch.sub(prompt_logits, prompt_logits.amax(dim=1, keepdim=True)).clamp_(min=-80.0)
        mass = shifted.exp_() @ onehot
        out = {}
        for attribute, part in zip(attributes, mass.split(sizes, dim=1)):
            out[attribute] = part.argmax(dim=1)
        return out

    def _onehot(self, attributes: tuple[str, ...]) -> tuple[Tensor, list[int]]:
        """(n_prompts, total classes) float 0/1: prompt p names class c of each attribute, stacked."""
        key = "onehot:" + ",".join(attributes)
        if key not in self._cache:
            blocks = []
            for attribute in attributes:
                labels = self.prompt_class[attribute] if attribute in self.prompt_class else self._missing(attribute)
                block = torch.zeros(self.n_prompts, len(self.classes[attribute]))
                named = labels >= 0
                block[torch.nonzero(named).squeeze(1), labels[named]] = 1.0
                blocks.append(block)
            self._cache[key] = [torch.cat(blocks, dim=1).to(self.text.dtype)]
        return self._cache[key][0], [len(self.classes[a]) for a in attributes]

    def _missing(self, attribute: str) -> Tensor:
        raise VlsaeError(f"the zero-shot head has no attribute {attribute!r}; it has {', '.join(self.attributes)}")

    def class_index(self, attribute: str) -> list[Tensor]:
        """For each class of ``attribute``, the (increasing) prompt columns that name it; kept, since
        every marginalisation of a sweep needs them (selecting them in column order adds the same
        numbers in the same order as a boolean mask, so the sums are the zoo evaluation's bit for bit)."""
        if attribute not in self.prompt_class:
            self._missing(attribute)
        if attribute not in self._cache:
            labels = self.prompt_class[attribute]
            self._cache[attribute] = [torch.nonzero(labels == c).squeeze(1) for c in range(len(self.classes[attribute]))]
        return self._cache[attribute]


# -- text embeddings through an adapter ----------------------------------------------

def logit_scale_of(adapter: Adapter) -> float:
    """The model's temperature: exp(logit_scale) of an open_clip model, else 100."""
    scale = getattr(getattr(adapter, "model", None), "logit_scale", None)
    if scale is None:
        return DEFAULT_LOGIT_SCALE
    return float(torch.as_tensor(scale).detach().float().exp().cpu())


@torch.no_grad()
def encode_texts(adapter: Adapter, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> Tensor:
    """(len(texts), d) final text embeddings of ``texts`` (caption-only records), L2-normalised unless
    ``normalize`` is false.

    Raises the one-line error for an adapter without a joint text embedding
    (LLaVA, a diffusion text encoder, timm): zero-shot needs a CLIP-style model.
    """
    if TEXT_HOOK not in adapter.hook_points():
        raise VlsaeError(f"zero-shot classification needs a CLIP-style model with image and text embeddings "
                         f"(hook {TEXT_HOOK}); {adapter.spec or adapter.registry_name} has none")
    if not texts:
        raise VlsaeError("no prompts to embed")
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = [PairRecord(key=str(start + i), image=None, caption=text)
                 for i, text in enumerate(texts[start: start + batch_size])]
        prepared = adapter.prepare(batch, modalities=("text",))
        rows.append(adapter.forward(prepared, TEXT_HOOK, "cls").acts["text"].float())
    rows = torch.cat(rows)
    return F.normalize(rows, dim=-1) if normalize else rows


# -- the two protocols ------------------------------------------------------------------

def shapesworld_head(adapter: Adapter, attributes: Sequence[str] = ZERO_SHOT_ATTRIBUTES,
                     batch_size: int = 256) -> ZeroShotHead:
    """Every single-object description ShapesWorld's vocabulary can say, marginalised per attribute
    (the zoo evaluation's protocol; see the module docstring)."""
    vocab = vocabulary()
    unknown = [a for a in attributes if a not in ZERO_SHOT_ATTRIBUTES]
    if unknown:
        raise VlsaeError(f"ShapesWorld zero-shot attributes are {', '.join(ZERO_SHOT_ATTRIBUTES)}, not {unknown[0]!r}")
    described = object_descriptions()
    classes = {a: list(vocab[a]) for a in attributes}
    prompt_class = {a: torch.tensor([classes[a].index(values[a]) for values, _ in described]) for a in attributes}
    texts = [text for _, text in described]
    raw = encode_texts(adapter, texts, batch_size, normalize=False)
    return ZeroShotHead(attributes=list(attributes), classes=classes, text=F.normalize(raw, dim=-1),
                        prompt_class=prompt_class, logit_scale=logit_scale_of(adapter), prompts=texts, raw=raw)


@dataclass
class ClassesFile:
    """A ``--classes`` file: class names, prompt templates and the attribute the names belong to.

    The file is JSON or YAML: ``{"classes": [...], "templates": ["a photo of a {}.", ...],
    "attribute": "class"}``; ``templates`` defaults to ``["a photo of a {}."]`` and
    ``attribute`` to ``class`` (the label a record gives in its ``json`` or ``cls``;
    ``shape`` etc. on ShapesWorld). A record's label is a class name or its index in ``classes``.
    """

    classes: list[str]
    templates: list[str]
    attribute: str = CLASS_ATTRIBUTE
    path: str = ""


def load_classes(path: str | Path) -> ClassesFile:
    """Read and check a ``--classes`` file (one-line errors for every way it can be wrong)."""
    path = Path(path)
    if not path.is_file():
        raise VlsaeError(f"--classes file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise VlsaeError(f"--classes file {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise VlsaeError(f"--classes file {path} needs a non-empty list 'classes' (and optionally 'templates', "
                         f"'attribute'), e.g. {{\"classes\": [\"cat\", \"dog\"], \"templates\": [\"a photo of a {{}}.\"]}}")
    unknown = sorted(set(data) - {"classes", "templates", "attribute"})
    if unknown:
        raise VlsaeError(f"--classes file {path} has an unknown key {unknown[0]!r}; its keys are classes, templates, attribute")
    classes = [str(c).strip() for c in data["classes"]]
    if any(not c for c in classes):
        raise VlsaeError(f"--classes file {path} has an empty class name")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise VlsaeError(f"--classes file {path} names class {repeated[0]!r} twice")
    templates = data.get("templates") or list(DEFAULT_TEMPLATES)
    if not isinstance(templates, list) or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise VlsaeError(f"--classes file {path}: every template must be a string with one '{{}}' for the class name, "
                         f"e.g. 'a photo of a {{}}.'")
    attribute = str(data.get("attribute") or CLASS_ATTRIBUTE)
    return ClassesFile(classes=classes, templates=list(templates), attribute=attribute, path=str(path))


def classes_head(adapter: Adapter, path: str | Path | ClassesFile, batch_size: int = 256) -> ZeroShotHead:
    """One template-ensembled embedding per class of a ``--classes`` file (CLIP's protocol):
    every template filled with the class name, embedded, normalised, averaged, renormalised."""
    spec = path if isinstance(path, ClassesFile) else load_classes(path)
    texts = [template.format(name) for name in spec.classes for template in spec.templates]
    raw = encode_texts(adapter, texts, batch_size, normalize=False).view(len(spec.classes), len(spec.templates), -1)
    text = F.normalize(F.normalize(raw, dim=-1).mean(dim=1), dim=-1)
    return ZeroShotHead(attributes=[spec.attribute], classes={spec.attribute: list(spec.classes)}, text=text,
                        prompt_class={spec.attribute: torch.arange(len(spec.classes))},
                        logit_scale=logit_scale_of(adapter),
                        prompts=[spec.templates[0].format(name) for name in spec.classes], raw=raw.mean(dim=1))


def head_summary(head: ZeroShotHead) -> dict[str, Any]:
    """What a results file records about the head (JSON-safe)."""
    return {"attributes": list(head.attributes), "classes": {a: list(c) for a, c in head.classes.items()},
            "prompts": head.n_prompts, "width": head.d, "logit_scale": head.logit_scale}
