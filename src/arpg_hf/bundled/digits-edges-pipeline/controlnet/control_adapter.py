"""Written by arpg-hf so that generic Hugging Face loaders (`trust_remote_code=True`) find ARPGControlAdapter.

It only imports the class from the installed package (`pip install arpg-hf`); nothing else runs.
"""

from arpg_hf.control_adapter import ARPGControlAdapter  # noqa: F401
