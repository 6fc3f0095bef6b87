"""conversion/convert_arpg_to_hf.py and arpg_hf.conversion: folders that reproduce the reference, model cards,
shape inference and checks, safe failure on bad checkpoints, atomic output, Hub upload (mocked)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from arpg_hf import ARPGConfig, ARPGPipeline, ARPGScheduler
from arpg_hf.conversion import (
    PRESET_REFERENCE_FIELDS,
    ConversionError,
    check_arpg_shapes,
    check_model_family,
    infer_arpg_fields,
    infer_vq_fields,
    main,
    resolve_checkpoint,
)
from arpg_hf.cpu_gemm import accelerator_available, onednn_available, packed_weights
from arpg_hf.model_card import PUBLISHED_RESULTS, create_model_card, recommended_sampling

from .conftest import read_json

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "conversion" / "convert_arpg_to_hf.py"
CASES = read_json("cases.json")["generate"]["cases"]


def convert_args(parity_dir, output_dir, arpg=None, vq=None, *extra):
    return [
        "--arpg-checkpoint",
        str(arpg or parity_dir / "arpg_ref.pt"),
        "--vq-checkpoint",
        str(vq or parity_dir / "vq_ref.pt"),
        "--reference-config",
        str(parity_dir / "config.json"),
        "--vq-config",
        str(parity_dir / "vq_config.json"),
        "--output-dir",
        str(output_dir),
        *extra,
    ]


def run_script(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def raw_checkpoint(parity_dir, tmp_path_factory):
    """The decoder checkpoint as a raw state dict (the fixture file wraps it under "model")."""
    path = tmp_path_factory.mktemp("raw") / "arpg_raw.pt"
    torch.save(torch.load(parity_dir / "arpg_ref.pt", weights_only=True)["model"], path)
    return path


@pytest.fixture(scope="module")
def converted_dir(parity_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "arpg-tiny"
    assert main(convert_args(parity_dir, output)) == 0
    return output


def test_script_converts_raw_layout_and_folder_is_complete(parity_dir, raw_checkpoint, tmp_path):
    result = run_script(*convert_args(parity_dir, tmp_path / "out", arpg=raw_checkpoint))
    assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["README.md", "model_index.json", "pipeline_arpg.py", "scheduler", "transformer", "vqvae"]
    assert (tmp_path / "out" / "transformer" / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left


@pytest.fixture(scope="module")
def converted_pipeline(converted_dir):
    pipe = ARPGPipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def converted_pipelines(converted_pipeline, converted_dir):
    """The folder loaded as by default (on a CPU-only machine with oneDNN: packed weights) and with plain weights."""
    plain = ARPGPipeline.from_pretrained(converted_dir, cpu_gemm="default")
    plain.set_progress_bar_config(disable=True)
    return {"auto": converted_pipeline, "default": plain}


@pytest.mark.parametrize("layout", ["auto", "default"])
@pytest.mark.parametrize("case", CASES, ids=[case["key"] for case in CASES])
def test_converted_folder_reproduces_reference_tokens(converted_pipelines, parity_dir, case, layout):
    generate = load_file(parity_dir / "generate.safetensors")
    pipe = converted_pipelines[layout]
    packs = layout == "auto" and onednn_available() and not accelerator_available()
    assert bool(packed_weights(pipe.transformer)) == packs
    pipe.scheduler = ARPGScheduler.from_config(
        pipe.scheduler.config, token_schedule=case["sample_schedule"], guidance_schedule=case["cfg_schedule"]
    )
    key = case["key"]
    tokens = pipe(
        generate[f"{key}.class_labels"],
        num_inference_steps=case["num_iter"],
        guidance_scale=case["guidance_scale"],
        top_k=1,
        orders=generate[f"{key}.orders"],
        output_type="latent",
    ).images
    assert torch.equal(tokens, generate[f"{key}.tokens"])


def test_both_layouts_give_identical_weights(converted_dir, parity_dir, raw_checkpoint, tmp_path):
    assert main(convert_args(parity_dir, tmp_path / "raw", arpg=raw_checkpoint)) == 0
    for component, name in (("transformer", "model.safetensors"), ("vqvae", "diffusion_pytorch_model.safetensors")):
        wrapped = load_file(converted_dir / component / name)
        raw = load_file(tmp_path / "raw" / component / name)
        assert wrapped.keys() == raw.keys()
        assert all(torch.equal(wrapped[k], raw[k]) for k in wrapped)


def test_model_card_metadata_and_provenance(converted_dir, parity_dir):
    card = ModelCard.load(converted_dir / "README.md")
    assert card.data.license == "mit"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"arpg", "arpg-hf"} <= set(card.data.tags)
    from arpg_hf.conversion import file_sha256

    assert file_sha256(str(parity_dir / "arpg_ref.pt")) in card.text
    assert file_sha256(str(parity_dir / "vq_ref.pt")) in card.text
    assert "ARPGPipeline.from_pretrained" in card.text and "@article{li2025autoregressive" in card.text


def test_scheduler_carries_recommended_settings(converted_dir):
    scheduler = ARPGScheduler.from_pretrained(converted_dir, subfolder="scheduler")
    assert scheduler.config.token_schedule == "arccos"
    assert scheduler.config.recommended_guidance_scale == 4.0
    assert scheduler.config.recommended_num_inference_steps == 64  # the 8x8 fixture grid


def test_preset_cards_carry_published_figures():
    config = ARPGConfig.from_preset("ARPG-L")
    sampling = recommended_sampling(config)
    assert sampling == dict(
        token_schedule="arccos", guidance_schedule="linear", guidance_scale=5.0, num_inference_steps=64
    )
    scheduler = ARPGScheduler(recommended_guidance_scale=5.0, recommended_num_inference_steps=64)
    card = create_model_card(config, scheduler.config, repo_id="someone/arpg-l", num_parameters=320_000_000)
    assert card.data.datasets == ["ILSVRC/imagenet-1k"]
    assert "ARPG-L" in card.data.tags
    assert "| 64 | arccos | linear 5.0 | 2.38 |" in card.text
    assert "| 64 | cosine | linear 4.5 | 2.44 | 292 |" in card.text
    assert 'from_pretrained("someone/arpg-l")' in card.text
    xxl = create_model_card(ARPGConfig.from_preset("ARPG-XXL"), scheduler.config)
    assert "| 1.94 | 340 |" in xxl.text
    assert recommended_sampling(ARPGConfig.from_preset("ARPG-XL"))["guidance_scale"] == 6.0
    assert PUBLISHED_RESULTS["ARPG-XL"][0]["fid"] == 2.10


# ----------------------------------------------------------------------------------- shape inference
def meta_arpg_state_dict(dim, n_layer, vocab=16384, classes=1000, ffn=None):
    ffn = ffn or -(-int(8 * dim / 3) // 256) * 256
    shapes = {
        "embeddings.weight": (vocab + classes + 3, dim),
        "head.weight": (vocab, dim),
        "layers.to_k.weight": (dim, dim),
        "layers.to_v.weight": (dim, dim),
    }
    for part in ("self_dec", "cross_dec"):
        for layer in range(n_layer // 2):
            shapes[f"layers.{part}.{layer}.attn.to_q.weight"] = (dim, dim)
            shapes[f"layers.{part}.{layer}.ffn.w1.weight"] = (ffn, dim)
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def test_infers_fields_from_shapes_and_names_the_mismatching_tensor():
    xl = meta_arpg_state_dict(1280, 36)
    assert infer_arpg_fields(xl) == dict(
        dim=1280, vocab_size=16384, num_classes=1000, num_self_layers=18, num_cross_layers=18, ffn_hidden_dim=3584
    )
    check_arpg_shapes(xl, PRESET_REFERENCE_FIELDS["ARPG-XL"], "xl")
    with pytest.raises(
        ConversionError,
        match=r"embeddings\.weight: expected shape \(17387, 1024\).*found \(17387, 1280\).*--preset ARPG-XL",
    ):
        check_arpg_shapes(xl, PRESET_REFERENCE_FIELDS["ARPG-L"], "xl")
    with pytest.raises(ConversionError, match=r"layers\.self_dec\.12.*24 gives 12 layers per pass, found 18"):
        check_arpg_shapes(xl, {**PRESET_REFERENCE_FIELDS["ARPG-XL"], "n_layer": 24}, "xl")
    with pytest.raises(ConversionError, match=r"ffn\.w1\.weight: expected shape \(4096, 1280\)"):
        check_arpg_shapes(xl, {**PRESET_REFERENCE_FIELDS["ARPG-XL"], "ffn_dim_multiplier": 1.2}, "xl")


def test_vq_fields_inferred_from_parity_checkpoint(parity_dir):
    state_dict = torch.load(parity_dir / "vq_ref.pt", weights_only=True)["model"]
    fields = infer_vq_fields(state_dict)
    assert fields == dict(
        codebook_size=512,
        codebook_embed_dim=8,
        ch=32,
        encoder_ch_mult=[1, 1, 2, 2, 4],
        z_channels=64,
        in_channels=3,
        out_channels=3,
    )


def test_config_mismatch_is_one_clear_error(parity_dir, tmp_path, capsys):
    wrong = tmp_path / "config.json"
    wrong.write_text('{"dim": 64, "n_layer": 4, "n_head": 4, "vocab_size": 1024, "num_classes": 10, "block_size": 64}')
    args = convert_args(parity_dir, tmp_path / "out")
    args[args.index("--reference-config") + 1] = str(wrong)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "head.weight: expected shape (1024, 64)" in err and "found (512, 64)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    wrong_vq = tmp_path / "vq.json"
    wrong_vq.write_text('{"ch": 64}')
    args = convert_args(parity_dir, tmp_path / "out", None, None)
    args[args.index("--vq-config") + 1] = str(wrong_vq)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "encoder.conv_in.weight: expected shape (64, 3, 3, 3)" in err and "ch 32" in err


# ---------------------------------------------------------------------------------- bad checkpoints
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def bad_checkpoints(parity_dir, folder):
    data = (parity_dir / "arpg_ref.pt").read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "corrupt": bytes(range(256)) * 8,
        "empty": b"",
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    paths["malicious"] = folder / "malicious.pt"
    torch.save({"model": _Payload(folder / "PWNED")}, paths["malicious"])
    paths["other_architecture"] = folder / "llamagen_gpt.pt"
    torch.save(
        {
            "tok_embeddings.weight": torch.zeros(8, 4),
            "cls_embedding.embedding_table.weight": torch.zeros(3, 4),
            "layers.0.attention.wqkv.weight": torch.zeros(12, 4),
        },
        paths["other_architecture"],
    )
    paths["swapped"] = parity_dir / "vq_ref.pt"
    return paths


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "truncated or corrupt"),
        ("corrupt", "not a torch checkpoint"),
        ("empty", "is empty"),
        ("malicious", "could run code, so it was refused"),
        ("other_architecture", "LlamaGen raster-order GPT"),
        ("swapped", "pass it as --vq-checkpoint"),
    ],
)
def test_bad_checkpoint_fails_cleanly_in_process(parity_dir, tmp_path, capsys, kind, message):
    path = bad_checkpoints(parity_dir, tmp_path)[kind]
    output = tmp_path / "out"
    assert main(convert_args(parity_dir, output, arpg=path)) == 1
    err = capsys.readouterr().err.strip()
    assert message in err
    assert err.count("\n") == 0 and "Traceback" not in err  # one line
    assert not output.exists() and not list(tmp_path.glob(".out.*"))
    assert not (tmp_path / "PWNED").exists()


def test_malicious_tokenizer_pickle_runs_nothing(parity_dir, tmp_path, capsys):
    path = bad_checkpoints(parity_dir, tmp_path)["malicious"]
    assert main(convert_args(parity_dir, tmp_path / "out", vq=path)) == 1
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_check_model_family_accepts_the_right_kind(parity_dir):
    arpg = torch.load(parity_dir / "arpg_ref.pt", weights_only=True)["model"]
    check_model_family(arpg, "arpg", "decoder")
    with pytest.raises(ConversionError, match="pass it as --arpg-checkpoint"):
        check_model_family(arpg, "vq", "tokenizer")


# --------------------------------------------------------------------------------- resolving, output
def test_resolve_checkpoint_local_and_hub_offline(parity_dir, monkeypatch):
    assert resolve_checkpoint(str(parity_dir / "arpg_ref.pt")) == str(parity_dir / "arpg_ref.pt")
    with pytest.raises(ConversionError, match="neither an existing file nor a Hub file reference"):
        resolve_checkpoint("no/such/local_file")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(parity_dir / "no-cache-here"))
    with pytest.raises(ConversionError, match=r"cannot be downloaded now.*hf download hp-l33/ARPG arpg_300m\.pt"):
        resolve_checkpoint("hp-l33/ARPG/arpg_300m.pt")


def test_existing_output_needs_overwrite_and_failed_write_keeps_old_folder(
    converted_dir, parity_dir, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    assert main(convert_args(parity_dir, output)) == 1
    assert "--overwrite" in capsys.readouterr().err

    def failing_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ARPGPipeline, "save_pretrained", failing_save)
    assert main(convert_args(parity_dir, output, None, None, "--overwrite")) == 1
    assert "disk full" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["out"] and (output / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    assert main(convert_args(parity_dir, output, None, None, "--overwrite", "--dtype", "bfloat16")) == 0
    assert sorted(os.listdir(tmp_path)) == ["out"] and not (output / "keep.txt").exists()
    weights = load_file(output / "transformer" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    vq = load_file(output / "vqvae" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in vq.values()} == {torch.float32}


def test_push_to_hub_uploads_the_finished_folder(parity_dir, tmp_path, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["upload"] = (repo_id, sorted(os.listdir(folder_path)))
            return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/1"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert (
        main(convert_args(parity_dir, tmp_path / "out", None, None, "--push-to-hub", "me/arpg-tiny", "--private")) == 0
    )
    assert calls["create"] == ("me/arpg-tiny", True, True)
    assert calls["upload"] == (
        "me/arpg-tiny",
        ["README.md", "model_index.json", "pipeline_arpg.py", "scheduler", "transformer", "vqvae"],
    )
    assert 'from_pretrained("me/arpg-tiny")' in (tmp_path / "out" / "README.md").read_text()


def test_pipeline_uses_recommended_settings_when_not_given(converted_pipeline):
    pipe = ARPGPipeline(**converted_pipeline.components)
    seen = []
    for recommended, expected in (((3.0, 5), (3.0, 5)), ((None, None), (4.0, 64))):
        pipe.scheduler = ARPGScheduler(
            recommended_guidance_scale=recommended[0], recommended_num_inference_steps=recommended[1]
        )
        original = pipe.scheduler.guidance_scale_for_step
        pipe.scheduler.guidance_scale_for_step = lambda step, scale: seen.append(scale) or original(step, scale)
        pipe([1], generator=torch.Generator().manual_seed(0), output_type="latent")
        assert (seen[-1], pipe.scheduler.num_inference_steps) == expected
    pipe([1], num_inference_steps=2, guidance_scale=1.5, output_type="latent")
    assert (seen[-1], pipe.scheduler.num_inference_steps) == (1.5, 2)


def test_pipe_push_to_hub_goes_through_diffusers_with_the_folder_card(converted_dir, monkeypatch):
    import diffusers.utils.hub_utils
    import huggingface_hub

    uploads = []

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(os.listdir(folder_path)), Path(folder_path, "README.md").read_text()))
        return "https://hf.co/commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: type("U", (), {"repo_id": repo_id})())
    monkeypatch.setattr(diffusers.utils.hub_utils, "upload_folder", fake_upload_folder)
    pipe = ARPGPipeline.from_pretrained(converted_dir)
    assert pipe.push_to_hub("me/arpg-tiny", private=True) == "https://hf.co/commit"
    repo_id, files, readme = uploads[0]
    assert repo_id == "me/arpg-tiny"
    assert files == ["README.md", "model_index.json", "pipeline_arpg.py", "scheduler", "transformer", "vqvae"]
    assert readme == (converted_dir / "README.md").read_text()  # keeps the conversion provenance
    fresh = ARPGPipeline(**pipe.components)  # not loaded from a folder: a new card
    fresh.push_to_hub("me/other")
    card = ModelCard(uploads[1][2])
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert 'from_pretrained("me/other")' in card.text
