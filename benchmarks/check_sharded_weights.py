"""Saves a published-size ARPG decoder (random weights) as sharded safetensors and loads it back, with our class and
with transformers' `AutoModel` (`trust_remote_code=True`): every tensor must come back bit for bit.

    python benchmarks/check_sharded_weights.py --preset ARPG-XXL --max-shard-size 2GB [--variant fp16]

Prints the shards written, the save and load times and the peak resident memory of the process (the model itself
takes 4 bytes per parameter in float32: 5.2 GB for ARPG-XXL).
"""

import argparse
import os
import resource
import tempfile
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ARPG-XXL", choices=["ARPG-L", "ARPG-XL", "ARPG-XXL"])
    parser.add_argument("--max-shard-size", default="2GB", help="as save_pretrained takes it, e.g. 2GB or 500MB")
    parser.add_argument("--variant", default=None, help='e.g. "fp16": written in float16 beside the default weights')
    parser.add_argument("--output-dir", default=None, help="where to write (default: a temporary folder)")
    return parser.parse_args(argv)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def equal_state_dicts(loaded: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    state = loaded.state_dict()
    return state.keys() == expected.keys() and all(torch.equal(state[name], expected[name]) for name in expected)


def main(args) -> None:
    from transformers import AutoModel

    from arpg_hf import ARPGConfig, ARPGForImageGeneration
    from arpg_hf.saved_folders import variant_state_dict

    torch.manual_seed(0)
    model = ARPGForImageGeneration(ARPGConfig.from_preset(args.preset)).eval()
    print(f"{args.preset}: {model.num_parameters() / 1e9:.2f}B parameters")
    expected = variant_state_dict(model.state_dict(), args.variant)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.output_dir or scratch
        start = time.perf_counter()
        model.save_pretrained(folder, max_shard_size=args.max_shard_size, variant=args.variant)
        saved = time.perf_counter() - start
        del model
        shards = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
        sizes = ", ".join(f"{os.path.getsize(os.path.join(folder, name)) / 1e9:.2f}" for name in shards)
        indexes = sorted(name for name in os.listdir(folder) if ".index" in name)
        print(f"saved in {saved:.1f} s: {len(shards)} shards ({sizes} GB) and {indexes}")
        loaders = {
            "ARPGForImageGeneration.from_pretrained": ARPGForImageGeneration.from_pretrained,
            "AutoModel.from_pretrained(trust_remote_code=True)": lambda path, **kwargs: AutoModel.from_pretrained(
                path, trust_remote_code=True, **kwargs
            ),
        }
        for name, load in loaders.items():
            start = time.perf_counter()
            loaded = load(folder, variant=args.variant)
            print(
                f"{name}: {type(loaded).__name__} in {time.perf_counter() - start:.1f} s, every tensor equal: "
                f"{equal_state_dicts(loaded, expected)}"
            )
            del loaded
    print(f"peak RSS of the process: {peak_rss_gb():.1f} GB")


if __name__ == "__main__":
    main(parse_args())
