"""The Gradio demo (Hugging Face Spaces), an application of arpg_hf: `python app.py --host 127.0.0.1 --port 7860
[--model FOLDER]` from the repository root, or `python space/app.py`.

`session` and `rendering` hold what the demo does with the model and need no Gradio; `app` builds the interface.
"""

from .session import DemoModel

__all__ = ["DemoModel", "build_demo", "main"]


def __getattr__(name):
    if name in ("build_demo", "main"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'demo' has no attribute {name!r}")
