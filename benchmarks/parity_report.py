"""Prints how closely arpg_hf reproduces the upstream reference on a parity fixture set.

    python benchmarks/parity_report.py [--parity-dir tests/fixtures/parity]

Every number is a max absolute difference (or an exact-match flag) between our output and the stored reference output.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from arpg_hf import ARPGPipeline, ARPGScheduler


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
    parser.add_argument(
        "--parity-dir", type=Path, default=default, help="folder with the fixtures (default: %(default)s)"
    )
    return parser.parse_args()


def generation_report(pipe, parity_dir):
    cases = json.loads((parity_dir / "cases.json").read_text())["generate"]["cases"]
    fixture = load_file(parity_dir / "generate.safetensors")
    base_config = pipe.scheduler.config
    for case in cases:
        key = case["key"]
        pipe.scheduler = ARPGScheduler.from_config(
            base_config, token_schedule=case["sample_schedule"], guidance_schedule=case["cfg_schedule"]
        )
        tokens = pipe(
            fixture[f"{key}.class_labels"],
            num_inference_steps=case["num_iter"],
            guidance_scale=case["guidance_scale"],
            top_k=1,
            orders=fixture[f"{key}.orders"],
            output_type="latent",
        ).images
        exact = torch.equal(tokens, fixture[f"{key}.tokens"])
        first = first_step_logits(pipe, fixture, key, case)
        error = (first - fixture[f"{key}.first_step_logits"]).abs().max().item()
        print(
            f"generate {key}: {case['num_iter']:>2} steps {case['sample_schedule']:<6} {case['cfg_schedule']:<8} "
            f"tokens exact={exact}  first-step logits max|diff|={error:.2e}"
        )
    pipe.scheduler = ARPGScheduler.from_config(base_config)


def first_step_logits(pipe, fixture, key, case):
    """CFG-combined logits of step 0, computed through the same step the pipeline runs (the model's forward)."""
    model = pipe.transformer
    labels = fixture[f"{key}.class_labels"]
    count = fixture[f"{key}.first_step_logits"].shape[1]
    queries = fixture[f"{key}.orders"][:count].expand(2 * len(labels), count)
    class_ids = model.class_token_ids(torch.cat([labels, torch.full_like(labels, -1)]))[:, None]
    with torch.no_grad():
        logits = pipe.decode_step(
            class_ids, torch.full_like(class_ids, -1), queries, model.allocate_cache(2 * len(labels))
        )
    conditional, unconditional = logits.chunk(2)
    return unconditional + (conditional - unconditional) * case["cfg_scale_per_step"][0]


def main():
    args = parse_args()
    parity_dir = args.parity_dir
    pipe = ARPGPipeline.from_reference_checkpoints(
        parity_dir / "arpg_ref.pt",
        parity_dir / "vq_ref.pt",
        reference_config=json.loads((parity_dir / "config.json").read_text()),
        vq_config=json.loads((parity_dir / "vq_config.json").read_text()),
    )
    pipe.set_progress_bar_config(disable=True)

    forward = load_file(parity_dir / "forward.safetensors")
    with torch.no_grad():
        output = pipe.transformer(forward["input_ids"], forward["class_labels"], orders=forward["orders"])
    print(
        f"forward: logits max|diff|={(output.logits - forward['logits']).abs().max().item():.2e}  "
        f"loss |diff|={(output.loss - forward['loss'][0]).abs().item():.2e}"
    )
    generation_report(pipe, parity_dir)

    vq = load_file(parity_dir / "vq.safetensors")
    with torch.no_grad():
        encoded = pipe.vqvae.encode(vq["x"])
        decoded_latents = pipe.vqvae.decode(encoded.latents).sample
        decoded_indices = pipe.vqvae.decode(vq["indices"]).sample
    quant = vq["quant"]  # stored (B, C, h, w), like our latents
    print(
        f"vq: indices exact={torch.equal(encoded.indices, vq['indices'])}  "
        f"latents max|diff|={(encoded.latents - quant).abs().max().item():.2e}  "
        f"decode(latents) max|diff|={(decoded_latents - vq['decode_quant']).abs().max().item():.2e}  "
        f"decode(indices) max|diff|={(decoded_indices - vq['decode_code']).abs().max().item():.2e}"
    )

    e2e = load_file(parity_dir / "e2e.safetensors")
    case = json.loads((parity_dir / "cases.json").read_text())["generate"]["cases"][0]  # e2e decodes case0
    generate = load_file(parity_dir / "generate.safetensors")
    pipe.scheduler = ARPGScheduler.from_config(
        pipe.scheduler.config, token_schedule=case["sample_schedule"], guidance_schedule=case["cfg_schedule"]
    )
    images = pipe(
        generate["case0.class_labels"],
        num_inference_steps=case["num_iter"],
        guidance_scale=case["guidance_scale"],
        top_k=1,
        orders=generate["case0.orders"],
        output_type="pt",
    ).images
    expected = (e2e["images"] / 2 + 0.5).clamp(0, 1)
    print(f"e2e (pipeline, output_type='pt'): images max|diff|={(images - expected).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
