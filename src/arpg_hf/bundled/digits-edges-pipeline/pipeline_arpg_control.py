"""Written by arpg-hf so that generic Hugging Face loaders (`trust_remote_code=True`) find ARPGControlPipeline.

It only imports the class from the installed package (`pip install arpg-hf`); nothing else runs.
"""

from arpg_hf.pipeline_arpg_control import ARPGControlPipeline  # noqa: F401
