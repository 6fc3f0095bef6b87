"""Written by arpg-hf so that generic Hugging Face loaders (`trust_remote_code=True`) find ARPGVQModel.

It only imports the class from the installed package (`pip install arpg-hf`); nothing else runs.
"""

from arpg_hf.vq_model import ARPGVQModel  # noqa: F401
