"""vlsae: multimodal sparse autoencoders.

Python API (the CLI is a thin skin over these):

    from vlsae import create_sae, list_archs, load_sae, save_sae, SparseCode
    sae = create_sae("topk", d_in=512, n_latents=4096, k=32)
    save_sae(sae, "runs/a");  sae = load_sae("runs/a")

Training is :mod:`vlsae.training` (``train``, ``TrainConfig``, ``TensorSource``)
and whole runs from a config are :func:`vlsae.training.run.run_training`.
"""
from vlsae.checkpoint import load_sae, save_sae
from vlsae.errors import VlsaeError
from vlsae.saes import SAE, SAEConfig, create_sae, get_sae_class, list_archs, register_sae
from vlsae.sparse import SparseCode

__version__ = "0.1.0"

__all__ = ["VlsaeError", "SparseCode", "SAE", "SAEConfig", "create_sae", "get_sae_class",
           "list_archs", "register_sae", "load_sae", "save_sae", "__version__"]
