"""Zero-shot classification with and without concept-level alignment (VL-SAE's enhancement).

:mod:`evals.zeroshot.head` is the shared zero-shot head (prompts, their text
embeddings and how they map to classes); the OOD scores use it too. The rest
of the package is ``vlsae zeroshot``: the concept-mixed scores, the
validation/test protocol, the report, and the downstream-fidelity metric
(zero-shot accuracy with an SAE's reconstructions spliced in).
"""
from evals.zeroshot.head import ClassesFile, ZeroShotHead, classes_head, encode_texts, load_classes, shapesworld_head

__all__ = ["ClassesFile", "ZeroShotHead", "classes_head", "encode_texts", "load_classes", "shapesworld_head"]
