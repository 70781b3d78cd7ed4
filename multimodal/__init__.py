"""multimodal: where activations come from.

Owns datasets (webdataset pair shards, the ShapesWorld generator), model
adapters (open_clip CLIP, transformers LLaVA, diffusers text encoders, timm),
activation extraction and the activation cache, SAE-V pair scoring and data
filtering, and the small embedded models trained on ShapesWorld.
"""
