#!/usr/bin/env python
"""The ARPG Gradio demo: `python app.py --host 127.0.0.1 --port 7860 [--model FOLDER_OR_HUB_ID]`.

The bundled digits model by default (offline). The app itself lives in `space/demo`; the Space (space/) runs it too.
"""

import sys

from space.demo import main

if __name__ == "__main__":
    sys.exit(main())
