#!/usr/bin/env python
"""Convert the published ARPG decoder (arpg_300m.pt / arpg_700m.pt / arpg_1b.pt) and LlamaGen VQ tokenizer
(vq_ds16_c2i.pt) checkpoints into a Hub-ready ARPGPipeline folder with a model card.

    python conversion/convert_arpg_to_hf.py \
        --arpg-checkpoint hp-l33/ARPG/arpg_300m.pt --vq-checkpoint FoundationVision/LlamaGen/vq_ds16_c2i.pt \
        --preset ARPG-L --output-dir arpg-l [--dtype bfloat16] [--push-to-hub you/arpg-l] [--private]

Same as `arpg-hf convert ...`; `--help` lists every option.
"""

import sys

from arpg_hf.conversion.command import main  # needs arpg-hf installed (`pip install -e .` in a checkout)

if __name__ == "__main__":
    sys.exit(main())
