"""Model cards (arpg_hf.model_card), the LICENSE file and the Space's card and requirements: base_model and model-index
eval_results of the published sizes only, usage snippets that run, MIT licence, pinned Space requirements."""

import configparser
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, SpaceCard
from packaging.requirements import Requirement

from arpg_hf import ARPGConfig, ARPGScheduler, conversion
from arpg_hf.conversion import convert as conversion_steps
from arpg_hf.labels import build_label2id, get_label_ids, imagenet_id2label
from arpg_hf.model_card import create_model_card, recommended_sampling

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]

# The upstream model zoo's figures (ImageNet 256x256, cosine schedule, 64 steps): FID, IS.
MODEL_ZOO = {"ARPG-L": (2.44, 292), "ARPG-XL": (2.10, 331), "ARPG-XXL": (1.94, 340)}
CHECKPOINTS = {"ARPG-L": "arpg_300m.pt", "ARPG-XL": "arpg_700m.pt", "ARPG-XXL": "arpg_1b.pt"}


def python_blocks(card: ModelCard) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)


def recommended_scheduler(config: ARPGConfig) -> ARPGScheduler:
    sampling = recommended_sampling(config)
    return ARPGScheduler(
        token_schedule=sampling["token_schedule"],
        guidance_schedule=sampling["guidance_schedule"],
        recommended_guidance_scale=sampling["guidance_scale"],
        recommended_num_inference_steps=sampling["num_inference_steps"],
    )


def convert_args(parity_dir, output_dir, arpg, vq):
    return [
        "--arpg-checkpoint",
        arpg,
        "--vq-checkpoint",
        vq,
        "--reference-config",
        str(parity_dir / "config.json"),
        "--vq-config",
        str(parity_dir / "vq_config.json"),
        "--output-dir",
        str(output_dir),
    ]


@pytest.fixture(scope="module")
def local_converted_dir(parity_dir, tmp_path_factory):
    """The tiny upstream-format fixtures converted from local files: not the published weights."""
    output = tmp_path_factory.mktemp("card") / "arpg-tiny"
    args = convert_args(parity_dir, output, str(parity_dir / "arpg_ref.pt"), str(parity_dir / "vq_ref.pt"))
    assert conversion.main(args) == 0
    return output


def test_license_file_is_mit():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the arpg-hf authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["license"] == "MIT"


@pytest.mark.parametrize("preset", sorted(MODEL_ZOO))
def test_published_size_card_has_base_model_and_eval_results(preset, tmp_path):
    config = ARPGConfig.from_preset(preset)
    scheduler = recommended_scheduler(config)
    provenance = [
        dict(component="transformer", source=f"hp-l33/ARPG/{CHECKPOINTS[preset]}", sha256="0" * 64),
        dict(component="vqvae", source="hp-l33/ARPG/vq_ds16_c2i.pt", sha256="1" * 64),
    ]
    repo_id = f"someone/{preset.lower()}"
    create_model_card(config, scheduler.config, repo_id=repo_id, provenance=provenance).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")  # what the Hub reads back

    assert card.data.base_model == "hp-l33/ARPG"
    assert card.data.library_name == "diffusers" and card.data.license == "mit"
    assert card.data.datasets == ["ILSVRC/imagenet-1k"]
    assert card.data.model_name == repo_id
    results = card.data.eval_results
    values = {result.metric_type: result.metric_value for result in results}
    assert values == dict(zip(("FID", "IS"), MODEL_ZOO[preset]))
    for result in results:
        assert result.task_type == "unconditional-image-generation"
        assert result.task_name == "Class-conditional image generation"
        assert (result.dataset_type, result.dataset_name) == ("ILSVRC/imagenet-1k", "ImageNet 256x256")
        assert result.source_url == "https://github.com/hp-l33/ARPG" and "reported by the authors" in result.source_name
        assert result.metric_args["num_inference_steps"] == 64 and result.metric_args["token_schedule"] == "cosine"
    assert "not measured by arpg-hf" in card.text
    assert "carry the upstream repositories' licence (MIT)" in card.text

    arpg_block, generic_block = python_blocks(card)
    assert f'ARPGPipeline.from_pretrained("{repo_id}")' in arpg_block
    assert f'DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)' in generic_block
    for block in (arpg_block, generic_block):
        assert 'class_labels = pipe.get_label_ids(["golden retriever", "otter"])' in block
        assert f"guidance_scale={recommended_sampling(config)['guidance_scale']}," in block
        assert "num_inference_steps=64," in block and "generator=torch.Generator().manual_seed(0)" in block
    assert f"--model {repo_id} --class-labels 207 360" in card.text


def test_imagenet_snippet_class_names_are_the_ids_it_names():
    assert get_label_ids(["golden retriever", "otter"], build_label2id(imagenet_id2label())) == [207, 360]


def test_conversion_of_upstream_hub_files_names_base_model(parity_dir, tmp_path, monkeypatch):
    """`arpg-hf convert --arpg-checkpoint hp-l33/ARPG/...`: the card's base_model is the upstream Hub repository
    (downloads replaced by the tiny fixtures, so the architecture is not a published size: no eval_results)."""
    local = {"hp-l33/ARPG/arpg_ref.pt": parity_dir / "arpg_ref.pt", "hp-l33/ARPG/vq_ref.pt": parity_dir / "vq_ref.pt"}
    monkeypatch.setattr(conversion_steps, "resolve_checkpoint", lambda argument: str(local[argument]))
    output = tmp_path / "out"
    assert conversion.main(convert_args(parity_dir, output, "hp-l33/ARPG/arpg_ref.pt", "hp-l33/ARPG/vq_ref.pt")) == 0
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == "hp-l33/ARPG"
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "| transformer | `hp-l33/ARPG/arpg_ref.pt` |" in card.text
    assert "carry the upstream repositories' licence (MIT)" in card.text


def test_local_fixture_conversion_claims_no_upstream_weights(local_converted_dir):
    card = ModelCard.load(local_converted_dir / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.base_model is None
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "## Results" not in card.text and "## License" not in card.text


def test_usage_snippet_runs(local_converted_dir, tmp_path, monkeypatch):
    card = ModelCard.load(local_converted_dir / "README.md")
    block = python_blocks(card)[0]
    assert "class_labels = [0, 1]" in block  # the fixture has 10 classes, not ImageNet's
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(block.replace("path/to/this/folder", str(local_converted_dir)), scope)
    assert len(scope["images"]) == 2 and (tmp_path / "sample.png").is_file()


def test_generic_usage_snippet_runs(local_converted_dir, tmp_path, monkeypatch):
    card = ModelCard.load(local_converted_dir / "README.md")
    block = python_blocks(card)[1]
    assert "import arpg_hf" not in block and "from arpg_hf" not in block
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(block.replace("path/to/this/folder", str(local_converted_dir)), scope)
    assert len(scope["images"]) == 2 and (tmp_path / "sample.png").is_file()


def test_trained_cards_have_no_eval_results(tmp_path):
    """Folders trained with train.py (results=[]) have no published figures, even at a published size, and name
    only the base model they were given."""
    config = ARPGConfig.from_preset("ARPG-L")
    training = {"steps": 10, "final loss": "7.1"}
    for base_model in (None, "someone/arpg-l"):
        card = create_model_card(config, {}, base_model=base_model, training=training, results=[])
        assert card.data.base_model == base_model
        assert card.data.eval_results is None and "model-index" not in card.content
        assert "## Results" not in card.text and "## License" not in card.text and "## Training" in card.text
    measured = dict(
        token_schedule="arccos",
        guidance_schedule="linear",
        guidance_scale=5.0,
        num_inference_steps=64,
        fid=3.21,
        inception_score=250,
    )
    card = create_model_card(config, {}, results=[measured])
    assert card.data.eval_results is None and card.data.base_model is None
    assert "Measured with this folder." in card.text and "| 3.21 | 250 |" in card.text


def test_digits_sized_card_has_no_eval_results_and_a_digits_snippet(tmp_path):
    config = tiny_config(num_classes=10)
    scheduler = ARPGScheduler(recommended_guidance_scale=2.0, recommended_num_inference_steps=16)
    card = create_model_card(
        config, scheduler.config, model_name="ARPG digits", datasets=["sklearn digits"], results=[], tags=["digits"]
    )
    card.save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results is None and card.data.base_model is None
    assert card.data.datasets == ["sklearn digits"]
    for block in python_blocks(card):
        assert "class_labels = [0, 1]" in block and "get_label_ids" not in block
        assert "num_inference_steps=16," in block and "guidance_scale=2.0," in block


# ---------------------------------------------------------------------------------------------------- the Space
def test_space_card_lists_the_models_it_runs():
    card = SpaceCard.load(REPO / "space" / "README.md")
    assert card.data.models == ["hp-l33/ARPG"]
    assert card.data.license == "mit" and card.data.sdk == "gradio"
    assert "ARPG_MODEL" in card.text


def test_space_requirements_are_pinned_and_satisfy_the_package():
    lines = [line.strip() for line in (REPO / "space" / "requirements.txt").read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = {
        Requirement(line).name.lower(): Requirement(line)
        for line in setup["options"]["install_requires"].strip().splitlines()
    }
    assert {"torch", "transformers", "diffusers", "huggingface-hub"} <= {r.name.lower() for r in requirements}
    for requirement in requirements:
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{requirement} is not pinned"
        if requirement.name.lower() in declared:  # the pin satisfies the package's own requirement
            assert declared[requirement.name.lower()].specifier.contains(specifier.version), requirement
