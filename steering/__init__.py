"""steering: interventions through SAE latents in a diffusion pipeline's text encoder.

    from steering import Add, Steering, bind_sae, text_adapter
    hooked = bind_sae(text_adapter(pipe), "runs/text-sae")          # checks hook point and width
    with Steering(pipe, [Add(sae=hooked, latents=[17], strength=4)]):
        images = generate(pipe, ["a red circle"] * 8, seed=0)          # multimodal.generation

- :mod:`steering.points`: an SAE bound to a text-encoder hook point (checks, decoder directions, dense code);
- :mod:`steering.interventions`: ``Add``, ``Clamp``, ``Ablate``, ``Concept`` (Concept Steerers), ``Delta``;
- :mod:`steering.hooks`: the ``Steering`` context manager (always removes its hooks) and ``steered_generate``;
- :mod:`steering.discovery`: latent statistics over prompts, SAeUron selectivity, flip ranking by a judge;
- :mod:`steering.features`: ``colour=blue`` / latent indices + a mode -> interventions;
- :mod:`steering.prompts`: ShapesWorld prompts, prompt files, caption-only shards.

Judging the images and the steering benchmark live in ``evals.steering``.
"""
from __future__ import annotations

from steering.discovery import (FlipSettings, LatentStats, ValueLatents, attribute_latents, discover, latent_stats,
                                selectivity, top_prompts, typical_activation, value_latents)
from steering.features import DEFAULT_PASSES, MODES, Feature, build_interventions, feature_latents, parse_feature
from steering.hooks import Steering, steered_generate
from steering.interventions import PASSES, Ablate, Add, Clamp, Concept, Delta, Intervention
from steering.points import HookedSAE, bind_sae, default_point, parse_positions, point_states, text_adapter
from steering.prompts import read_prompts, shapes_prompts, write_prompt_shards

__all__ = ["Steering", "steered_generate", "Intervention", "Add", "Clamp", "Ablate", "Concept", "Delta", "PASSES",
           "HookedSAE", "bind_sae", "text_adapter", "default_point", "point_states", "parse_positions", "LatentStats",
           "latent_stats", "selectivity", "typical_activation", "top_prompts", "ValueLatents", "value_latents",
           "attribute_latents", "FlipSettings", "discover", "MODES", "DEFAULT_PASSES", "Feature", "parse_feature",
           "feature_latents", "build_interventions", "read_prompts", "shapes_prompts", "write_prompt_shards"]
