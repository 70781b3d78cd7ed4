"""``vlsae zeroshot``: plain and concept-enhanced zero-shot accuracy of a model + SAE on labelled shards.

Order of work, cheapest checks first: the flags and ``--out`` (one line, before
anything loads), the ``--classes`` file, the SAE, the model, the SAE's width
against the model's embeddings, the labels (a text-only pass over the shards),
the image embeddings (an activation cache, or extracted), then one scoring
pass over them for every (variant, λ). The report folder is written in a
hidden staging folder and moved into place, so ``out`` is either the old
report or the whole new one.
"""
from __future__ import annotations

import io
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from multimodal.adapters import Adapter, create_adapter
from multimodal.pairs import DEFAULT_MAX_SKIPPED, check_max_skipped, expand_urls
from multimodal.zoo.shapes_clip import ZERO_SHOT_ATTRIBUTES
from vlsae.checkpoint import load_sae
from vlsae.errors import VlsaeError
from vlsae.files import check_writable_dir, replace_dir

from evals.zeroshot.concept import VARIANTS, ConceptMatcher, check_sae, sweep_predictions
from evals.zeroshot.data import LabelledImages, cached_images, extracted_images, read_labels, split
from evals.zeroshot.head import ZeroShotHead, classes_head, head_summary, load_classes, shapesworld_head
from evals.zeroshot.protocol import DEFAULT_LAMBDAS, evaluate_attribute, mean_gain
from evals.zeroshot.report import predictions_csv, write_outputs

SHAPESWORLD_PROTOCOL = ("CLIP's softmax over every single-object description ShapesWorld's vocabulary can say "
                        "(9,240 prompts), probability mass summed per attribute value (the zoo evaluation)")
CLASSES_PROTOCOL = "one template-ensembled text embedding per class (CLIP's evaluation), softmax over the classes"


def parse_attributes(attributes: str | Sequence[str] | None) -> list[str]:
    """'shape,colour' / ['shape'] / None (all four) -> a checked list of ShapesWorld attributes."""
    if attributes is None or attributes == "" or attributes == "all":
        return list(ZERO_SHOT_ATTRIBUTES)
    names = [a.strip() for a in (attributes.split(",") if isinstance(attributes, str) else attributes) if a.strip()]
    unknown = [a for a in names if a not in ZERO_SHOT_ATTRIBUTES]
    if unknown or not names:
        raise VlsaeError(f"--attribute takes {', '.join(ZERO_SHOT_ATTRIBUTES)} (comma-separated, or all), "
                         f"not {unknown[0] if unknown else 'nothing'!r}")
    return list(dict.fromkeys(names))


def check_lambdas(lambdas: Sequence[float]) -> list[float]:
    values = sorted({float(v) for v in lambdas})
    if not values or values[0] != 0.0 or values[-1] > 1.0 or values[0] < 0.0:
        raise VlsaeError(f"--lambdas must lie in [0, 1] and include 0 (plain zero-shot), got {list(lambdas)}")
    return values


def check_variants(variants: str | Sequence[str]) -> tuple[str, ...]:
    names = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants) if v.strip()]
    if names == ["both"]:
        return VARIANTS
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise VlsaeError(f"--variant takes concept, decoder or both, not {unknown[0] if unknown else 'nothing'!r}")
    return tuple(dict.fromkeys(names))


def load_images(adapter: Adapter, data: str, head: ZeroShotHead, classes_file: str, acts: str | None, model: str,
                batch_size: int, max_skipped: float, limit: int | None, progress: bool) -> LabelledImages:
    """The labelled records of ``data`` and their final image embeddings (from ``acts`` or extracted)."""
    keys, labels, left_out = read_labels(data, head.classes, classes_file=classes_file, max_skipped=max_skipped,
                                         limit=limit)
    image = cached_images(acts, keys, model) if acts else extracted_images(adapter, data, keys, batch_size=batch_size,
                                                                           max_skipped=max_skipped, progress=progress)
    head.check_width(int(image.shape[1]))
    return LabelledImages(keys=keys, image=image, labels=labels, left_out=left_out)


def score(head: ZeroShotHead, sae: Any, images: LabelledImages, lambdas: list[float], variants: tuple[str, ...],
          val_fraction: float = 0.5, seed: int = 0, resamples: int = 1000) -> tuple[dict[str, Any], list[Any], str]:
    """(results, per-attribute results, predictions.csv text): the scoring pass and the protocol."""
    val, test = split(len(images), val_fraction, seed)
    started = time.perf_counter()
    matcher = ConceptMatcher.build(sae, head)
    swept = sweep_predictions(matcher, images.image, head.attributes, lambdas, variants)
    scoring_seconds = time.perf_counter() - started
    splits = ["test"] * len(images)
    for i in val.tolist():
        splits[i] = "val"
    buffer = io.StringIO()
    results = []
    for attribute in head.attributes:
        truth = images.labels[attribute]
        result, enhanced = evaluate_attribute(attribute, len(head.classes[attribute]), truth, swept["plain"][attribute],
                                              {v: swept[v][attribute] for v in variants}, lambdas, val, test,
                                              resamples=resamples, seed=seed)
        results.append(result)
        predictions_csv(images.keys, splits, attribute, head.classes[attribute], truth, swept["plain"][attribute],
                        enhanced, buffer)
    summary = {"attributes": [r.to_dict() for r in results], "mean_gain": mean_gain(results),
               "mean_plain_test": sum(r.plain_test for r in results) / len(results),
               "mean_enhanced_test": sum(r.enhanced_test for r in results) / len(results),
               "lambdas": lambdas, "variants": list(variants), "records": len(images), "left_out": images.left_out,
               "scoring_seconds": round(scoring_seconds, 3)}
    return summary, results, buffer.getvalue()


def run_zeroshot(sae: str | Path, model: str, data: str, out: str | Path, attributes: str | Sequence[str] | None = None,
                 classes: str | None = None, acts: str | None = None, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                 variant: str | Sequence[str] = "both", val_fraction: float = 0.5, seed: int = 0,
                 resamples: int = 1000, limit: int | None = None, batch_size: int = 128, device: str = "auto",
                 max_skipped: float = DEFAULT_MAX_SKIPPED, overwrite: bool = False, progress: bool = True,
                 adapter: Adapter | None = None, head: ZeroShotHead | None = None) -> dict[str, Any]:
    """The whole ``vlsae zeroshot`` job; returns results.json's content plus ``index`` (the page).

    ``adapter`` and ``head`` may be passed in, already built for ``model`` (the demo reuses them).
    """
    started = time.perf_counter()
    out = check_writable_dir(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise VlsaeError(f"{out} is not empty; choose another --out or pass --overwrite")
    check_max_skipped(max_skipped)
    lambdas = check_lambdas(lambdas)
    variants = check_variants(variant)
    expand_urls(data)
    spec = load_classes(classes) if classes else None
    chosen = [spec.attribute] if spec else parse_attributes(attributes)
    named = [] if attributes in (None, "", "all") else \
        [a.strip() for a in (attributes.split(",") if isinstance(attributes, str) else attributes) if a.strip()]
    if spec and named and named != chosen:
        raise VlsaeError(f"--classes {classes} is for attribute {spec.attribute!r}; leave out --attribute or set "
                         f"'attribute' in the file")
    if limit is not None and limit < 2:
        raise VlsaeError(f"--limit must be at least 2 (a validation and a test record), got {limit}")
    loaded = load_sae(sae).eval()
    adapter = adapter or create_adapter(model, device=device)
    if head is None:
        head = classes_head(adapter, spec) if spec else shapesworld_head(adapter, chosen)
    elif head.attributes != chosen:
        head = ZeroShotHead(attributes=chosen, classes={a: head.classes[a] for a in chosen}, text=head.text,
                            prompt_class={a: head.prompt_class[a] for a in chosen}, logit_scale=head.logit_scale,
                            prompts=head.prompts, raw=head.raw)
    check_sae(loaded, head.d, model)
    head_seconds = time.perf_counter() - started
    images = load_images(adapter, data, head, spec.path if spec else "", acts, model, batch_size, max_skipped, limit,
                         progress)
    results, attribute_results, predictions = score(head, loaded, images, lambdas, variants, val_fraction, seed,
                                                    resamples)
    results["protocol"] = CLASSES_PROTOCOL if spec else SHAPESWORLD_PROTOCOL
    results["head"] = head_summary(head)
    results["settings"] = {"sae": str(sae), "model": model, "data": str(data), "acts": acts or "(extracted)",
                           "classes": classes or "(ShapesWorld descriptions)", "val_fraction": val_fraction,
                           "seed": seed, "bootstrap resamples": resamples}
    results["seconds"] = {"load": round(head_seconds, 2), "total": round(time.perf_counter() - started, 2),
                          "scoring": results.pop("scoring_seconds")}
    staging = out.with_name(f".{out.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        write_outputs(staging, results, attribute_results, lambdas, predictions)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**results, "index": str(out / "index.html")}


def describe(result: dict[str, Any]) -> list[str]:
    """The lines ``vlsae zeroshot`` prints."""
    lines = [f"{result['records']} labelled records; test accuracy, plain -> enhanced (gain, 95 % CI):"]
    for r in result["attributes"]:
        lines.append(f"  {r['attribute']:<9} {100 * r['plain_test']:5.1f} -> {100 * r['enhanced_test']:5.1f} % "
                     f"({100 * r['gain']:+.2f} [{100 * r['gain_low']:+.2f}, {100 * r['gain_high']:+.2f}]; "
                     f"{r['variant']}, λ {r['lam']:g})")
    lines.append(f"mean gain {100 * result['mean_gain']:+.2f} points; scoring {result['seconds']['scoring']:.2f} s, "
                 f"total {result['seconds']['total']:.1f} s")
    lines.append(f"report: {result['index']}")
    return lines


__all__ = ["run_zeroshot", "describe", "score", "load_images", "parse_attributes"]
