import pytest
import torch
from safetensors.torch import load_file

from arpg_hf import ARPGConfig, ARPGForImageGeneration
from arpg_hf.modeling_arpg import CLASS_POSITION

from .conftest import get_dummy_transformer, tiny_config


@pytest.fixture(scope="module")
def tiny_model():
    return get_dummy_transformer()


# ------------------------------------------------------------------------------------------- configuration
def test_presets_match_the_published_sizes():
    expected = {"ARPG-L": (320e6, 12, 1024), "ARPG-XL": (719e6, 18, 1280), "ARPG-XXL": (1.3e9, 24, 1536)}
    for name, (params, layers, width) in expected.items():
        config = ARPGConfig.from_preset(name)
        assert config.num_self_attention_layers == config.num_cross_attention_layers == layers
        assert config.hidden_size == width
        with torch.device("meta"):
            count = sum(p.numel() for p in ARPGForImageGeneration(config).parameters())
        assert abs(count - params) / params < 0.03, (name, count)


def test_derived_ids_and_sizes():
    config = ARPGConfig(vocab_size=512, num_classes=10, hidden_size=64, num_attention_heads=4)
    assert (config.mask_token_id, config.class_token_offset, config.null_class_token_id) == (512, 513, 523)
    assert config.num_embeddings == 525
    assert config.intermediate_size == 256  # find_multiple(int(2 * 4 * 64 / 3) = 170, 256)
    assert (
        ARPGConfig(hidden_size=64, num_attention_heads=4, ffn_dim_multiplier=1.5, multiple_of=32).intermediate_size
        == 256
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "divisible by num_attention_heads"),
        (dict(hidden_size=72, num_attention_heads=12), "divisible by 4"),
        (dict(vocab_size=0), "positive integer"),
        (dict(class_dropout_prob=1.5), r"\[0, 1\)"),
    ],
)
def test_inconsistent_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        ARPGConfig(**fields)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="ARPG-XL"):
        ARPGConfig.from_preset("ARPG-M")


# ---------------------------------------------------------------------------------------------- forward
def test_forward_matches_reference_fixture(reference_pipeline, parity_dir):
    fixture = load_file(parity_dir / "forward.safetensors")
    model = reference_pipeline.transformer
    with torch.no_grad():
        output = model(fixture["input_ids"], fixture["class_labels"], orders=fixture["orders"])
    torch.testing.assert_close(output.logits, fixture["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(output.loss, fixture["loss"][0], atol=1e-5, rtol=0)
    assert torch.equal(output.orders, fixture["orders"])


def test_eager_and_sdpa_attention_agree(tiny_model, monkeypatch):
    """`set_attn_implementation` switches a built model (transformers' API), and both attentions agree."""
    input_ids = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 4])
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    with torch.no_grad():
        sdpa = tiny_model(input_ids, labels, orders=orders).logits
        tiny_model.set_attn_implementation("eager")
        try:
            assert tiny_model.config._attn_implementation == "eager"
            sdpa_calls = []
            monkeypatch.setattr(
                torch.nn.functional, "scaled_dot_product_attention", lambda *args, **kwargs: sdpa_calls.append(args)
            )
            eager = tiny_model(input_ids, labels, orders=orders).logits
            assert not sdpa_calls  # the plain matmul + softmax path ran
            monkeypatch.undo()
            with pytest.raises(ImportError, match="FlashAttention2"):  # supported, but the package is absent here
                tiny_model.set_attn_implementation("flash_attention_2")
        finally:
            tiny_model.set_attn_implementation("sdpa")
    assert tiny_model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


def test_forward_is_causal_in_decoding_order(tiny_model):
    """Changing the token decoded at step i changes no logit before step i + 1 (query i sees inputs 0..i)."""
    input_ids = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(2))
    orders = torch.randperm(16, generator=torch.Generator().manual_seed(3))[None]
    changed = input_ids.clone()
    changed[0, orders[0, 7]] = (changed[0, orders[0, 7]] + 1) % 32
    with torch.no_grad():
        before = tiny_model(input_ids, torch.tensor([1]), orders=orders).logits
        after = tiny_model(changed, torch.tensor([1]), orders=orders).logits
    torch.testing.assert_close(before[:, :8], after[:, :8], atol=0, rtol=0)
    assert (before[:, 8:] - after[:, 8:]).abs().max() > 1e-3


def test_random_orders_follow_the_generator(tiny_model):
    input_ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        first = tiny_model(input_ids, labels, generator=torch.Generator().manual_seed(5))
        second = tiny_model(input_ids, labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.orders, second.orders) and torch.equal(first.logits, second.logits)
    for row in first.orders:
        assert sorted(row.tolist()) == list(range(16))
    assert not torch.equal(first.orders[0], first.orders[1])


def test_labels_default_to_inputs_and_ignore_index(tiny_model):
    input_ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([1, 2])
    orders = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        default = tiny_model(input_ids, labels, orders=orders)
        explicit = tiny_model(input_ids, labels, orders=orders, labels=input_ids)
        ignored = input_ids.clone()
        ignored[:, 8:] = -100
        partial = tiny_model(input_ids, labels, orders=orders, labels=ignored)
    assert torch.equal(default.loss, explicit.loss)
    with torch.no_grad():
        narrow = tiny_model(input_ids.int(), labels.int(), orders=orders[0].int(), labels=input_ids.int())
    assert torch.equal(narrow.loss, default.loss)  # int32 inputs and a shared 1-D order work the same
    with pytest.raises(ValueError, match="shape of input_ids"):
        tiny_model(input_ids, labels, labels=input_ids[:, :8])
    expected = torch.nn.functional.cross_entropy(default.logits[:, :8].flatten(0, 1), input_ids[:, :8].flatten())
    torch.testing.assert_close(partial.loss, expected)


def test_class_dropout_only_in_training():
    model = get_dummy_transformer(class_dropout_prob=0.999).train()
    input_ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(7))
    orders = torch.arange(16)
    null_labels = torch.full((4,), -1)
    with torch.no_grad():
        model.train()
        dropped = model(
            input_ids, torch.tensor([0, 1, 2, 3]), orders=orders, generator=torch.Generator().manual_seed(0)
        )
        model.eval()
        kept = model(input_ids, torch.tensor([0, 1, 2, 3]), orders=orders)
        # the null class, fed by hand through the trunk, gives the dropped logits
        class_ids = model.class_token_ids(null_labels)[:, None]
        inputs = torch.cat([class_ids, input_ids[:, :-1]], 1)
        positions = torch.cat([torch.full((4, 1), CLASS_POSITION), torch.arange(15).expand(4, 15)], 1)
        null = model.lm_head(model.model(inputs, positions, orders.expand(4, 16)).last_hidden_state)
    torch.testing.assert_close(dropped.logits, null, atol=1e-6, rtol=0)
    assert (kept.logits - null).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    input_ids = torch.randint(0, 32, (2, 16))
    labels = torch.tensor([1, 2])
    grads = []
    for checkpointing in (False, True):
        model = get_dummy_transformer().train()
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers >= 5 name of gradient_checkpointing_enable
            assert model.is_activation_checkpointing
        model(input_ids, labels, orders=torch.arange(16)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_head_starts_at_zero_and_loss_is_log_vocab():
    model = ARPGForImageGeneration(tiny_config())
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert model.model.embed_tokens.weight.std() > 0
    input_ids = torch.randint(0, 32, (2, 16))
    loss = model(input_ids, torch.tensor([0, 1])).loss
    torch.testing.assert_close(loss, torch.log(torch.tensor(32.0)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.full((1, 16), 32)), r"\[0, 32\)"),
        (dict(input_ids=torch.zeros(1, 15, dtype=torch.long)), "4x4 = 16"),
        (dict(class_labels=torch.tensor([5])), r"\[0, 5\)"),
        (dict(orders=torch.zeros(16, dtype=torch.long)), "permutation"),
        (dict(orders=torch.arange(15)), "shape"),
    ],
)
def test_bad_training_inputs_raise(tiny_model, kwargs, message):
    inputs = dict(input_ids=torch.zeros(1, 16, dtype=torch.long), class_labels=torch.tensor([0]))
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_model(**inputs)


def test_save_and_load_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = ARPGForImageGeneration.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        a = tiny_model(input_ids, torch.tensor([0, 1]), orders=torch.arange(16)).logits
        b = loaded(input_ids, torch.tensor([0, 1]), orders=torch.arange(16)).logits
    assert torch.equal(a, b)
    half = ARPGForImageGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
