"""steering: interventions during generation.

Will own hooks that add, clamp or ablate SAE latents inside a diffusion text
encoder or a LLaVA decoder layer, and attribute discovery for steering. No
code yet: it arrives with the steering issue.
"""
