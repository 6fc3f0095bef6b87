"""Hugging Face Spaces entry point: the arpg-hf Gradio demo (see README.md for the Space settings).

The model is the bundled digits pipeline unless the Space variable ARPG_MODEL names a pipeline folder or Hub id.
Spaces set GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which the app uses when --host / --port are not given.
"""

import os
import sys

from demo import main  # space/demo, beside this file

if __name__ == "__main__":
    sys.exit(main(["--model", os.environ["ARPG_MODEL"]] if os.environ.get("ARPG_MODEL") else []))
