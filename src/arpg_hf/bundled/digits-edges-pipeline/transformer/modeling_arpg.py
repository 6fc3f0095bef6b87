"""Written by arpg-hf so that generic Hugging Face loaders (`trust_remote_code=True`) find ARPGForImageGeneration.

It only imports the class from the installed package (`pip install arpg-hf`); nothing else runs.
"""

from arpg_hf.modeling_arpg import ARPGForImageGeneration  # noqa: F401
