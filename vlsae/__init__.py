"""vlsae: multimodal sparse autoencoders.

Python API (the CLI is a thin skin over these):

    from vlsae import create_sae, list_archs, load_sae, save_sae, SparseCode
"""
from vlsae.errors import VlsaeError
from vlsae.sparse import SparseCode
from vlsae.saes import SAE, SAEConfig, create_sae, get_sae_class, list_archs, register_sae

__version__ = "0.1.0"

__all__ = ["VlsaeError", "SparseCode", "SAE", "SAEConfig", "create_sae", "get_sae_class",
           "list_archs", "register_sae", "__version__"]
