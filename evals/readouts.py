"""The ``zeroshot`` readout: CLIP's zero-shot class logits as the trainer's downstream function.

The trainer's readout (:mod:`vlsae.training.readout`) is a downstream function
of the activations; g-SAE selects latents with its gradient, and any SAE's
training summary reports how well its reconstruction keeps it. Run configs
name one by kind; this one is registered through the ``vlsae.readouts`` entry
point, because it needs a model adapter and the zero-shot head, which vlsae
must not import (the planted suites' readout is :mod:`evals.synthetic.readout`):

- ``zeroshot`` ``{kind: zeroshot, attribute: shape}`` or ``{kind: zeroshot,
  classes: FILE}``: on an activation cache of a CLIP-style model's image
  embeddings (``data.acts`` with ``modality: image``, hook ``final`` or
  ``visual.final``), the zero-shot class log-probabilities against the class
  prompts of :mod:`evals.zeroshot.head` (ShapesWorld's marginalised
  descriptions, or a ``--classes`` file's template-ensembled prompts); the
  downstream loss is the cross-entropy against the predicted class. ``model``
  defaults to the cache's own source model.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from evals.zeroshot.head import ZeroShotHead, classes_head, shapesworld_head
from multimodal.adapters import create_adapter
from multimodal.cache import read_manifest
from vlsae.errors import VlsaeError
from vlsae.training.readout import Readout, check_options, register_readout
from vlsae.training.sources import DataSpec

ZEROSHOT_HOOKS = ("final", "visual.final")


class ZeroShotReadout(nn.Module):
    """(batch, d) raw image embeddings -> (batch, n_classes) log-probabilities of one attribute's classes."""

    def __init__(self, head: ZeroShotHead, attribute: str):
        super().__init__()
        self.head = head
        self.attribute = attribute

    def forward(self, x: Tensor) -> Tensor:
        device = self.head.text.device
        return self.head.class_log_probs(x.to(device), self.attribute).to(x.device)


@register_readout("zeroshot")
def zeroshot_readout(options: dict[str, Any], data: DataSpec, d_in: int) -> Readout:
    allowed = {"attribute": "ShapesWorld attribute whose classes are read: shape, colour, size, position (default shape)",
               "classes": "a --classes JSON/YAML file of class names and prompt templates, instead of ShapesWorld's",
               "model": "the CLIP-style adapter spec (default: the activation cache's source model)"}
    check_options(options, allowed, "zeroshot")
    if not data.acts:
        raise VlsaeError("readout 'zeroshot' reads a CLIP model's image embeddings: use it with data.acts (an activation "
                         "cache of the model's final embeddings) and modality image")
    manifest = read_manifest(data.acts)
    if data.modality != "image":
        raise VlsaeError("readout 'zeroshot' scores image embeddings against class prompts: train on --modality image")
    if manifest.get("hook") not in ZEROSHOT_HOOKS:
        raise VlsaeError(f"readout 'zeroshot' needs the joint embedding (hook final or visual.final), but {data.acts} "
                         f"holds hook {manifest.get('hook')!r}")
    spec = str(options.get("model") or manifest.get("source") or "")
    if not spec:
        raise VlsaeError(f"{data.acts} does not say which model it came from; give readout.model (e.g. shapes-clip)")
    adapter = create_adapter(spec, device="cpu")
    if options.get("classes"):
        head = classes_head(adapter, str(options["classes"]))
        attribute = head.attributes[0]
    else:
        attribute = str(options.get("attribute", "shape"))
        head = shapesworld_head(adapter, [attribute])
    head.check_width(d_in, what=f"the activations of {data.acts}")
    head.text = head.text.detach()
    return Readout(ZeroShotReadout(head, attribute), outputs="logits", name=f"zeroshot {attribute}",
                   info={"model": spec, "attribute": attribute, "prompts": head.n_prompts})
