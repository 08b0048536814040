"""The ``transformers`` cards (pathray.encoders.zoo.hf) against their official code.

* Phikon, Phikon-v2, Midnight-12k: the official code *is* ``transformers``. The reference builds
  the card's class with ``from_pretrained`` from a directory holding the hub ``config.json`` (a dict
  below), the hub ``preprocessor_config.json`` where the card uses ``AutoImageProcessor``, and the
  very ``model.safetensors`` pathray loads; it runs the card's transforms on PIL images of real
  H&E tiles and the card's pooling, with transformers' default attention (sdpa), and must match
  pathray's embedding to 1e-5 (fp32) at 224 px (the native tile) and 256 px (resized).
* Hibou-B / Hibou-L: the hub model is ``trust_remote_code``; its official counterpart is the
  HistAI/hibou repository. ``tests/reference/hibou_golden.py`` ran it (strict load of pathray's
  weights) and froze its embeddings in ``tests/data/hibou-*_golden.npz``.

Random weights are written in the hub layout (``save_pretrained``'s key names) and loaded strictly;
full-size architectures are checked on the meta device.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from pathray.encoders import EncoderConfig, get_spec, load_encoder
from pathray.encoders.build import count_params, create_model
from pathray.encoders.builders import get_builder
from pathray.errors import WeightsMismatchError

COVERED_MODELS = ("phikon", "phikon-v2", "midnight-12k", "hibou-b", "hibou-l")
TOL = 1e-5
DATA = Path(__file__).parent / "data"
GOLDEN_SCRIPT = "tests/reference/hibou_golden.py"
#: depth of the random weights compared on CPU (full widths, heads, registers, FFN and pooling)
DEPTH = {"phikon": 2, "phikon-v2": 1, "midnight-12k": 1, "hibou-b": 2, "hibou-l": 1}
N_TILES = 3
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])

#: the hub config.json files. phikon: owkin/phikon@e9ad8d1 verbatim. hibou-b: histai/hibou-b@5cc6343
#: verbatim but for the backbone-only keys (out_features, out_indices, stage_names). phikon-v2 and
#: midnight: model class and sizes as their cards/configs state (Dinov2Model; phikon-v2 1024/24/16,
#: patch 16, no SwiGLU; midnight 1536/40/24, patch 14, SwiGLU), DINOv2 defaults elsewhere, image_size
#: 224 inferred (the files could not be read here; see the specs' notes).
HUB_CONFIGS = {
    "phikon": {
        "_name_or_path": "owkin/ibot-vit-base-patch16-224-pancancer",
        "architectures": ["ViTModel"],
        "attention_probs_dropout_prob": 0.0,
        "encoder_stride": 16,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": 768,
        "image_size": 224,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-12,
        "model_type": "vit",
        "num_attention_heads": 12,
        "num_channels": 3,
        "num_hidden_layers": 12,
        "patch_size": 16,
        "qkv_bias": True,
        "torch_dtype": "float32",
        "transformers_version": "4.34.0",
    },
    "hibou-b": {
        "_name_or_path": "/home/ubuntu/hibou-local-weight",
        "apply_layernorm": True,
        "architectures": ["Dinov2ModelWithRegisters"],
        "attention_probs_dropout_prob": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dinov2.Dinov2Config",
            "AutoModel": "modeling_dinov2.Dinov2ModelWithRegisters",
        },
        "drop_path_rate": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": 768,
        "image_size": 224,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-06,
        "layerscale_value": 1.0,
        "mlp_ratio": 4,
        "model_type": "dinov2",
        "num_attention_heads": 12,
        "num_channels": 3,
        "num_hidden_layers": 12,
        "num_register_tokens": 4,
        "patch_size": 14,
        "qkv_bias": True,
        "reshape_hidden_states": True,
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
        "use_swiglu_ffn": True,
    },
    "phikon-v2": {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 16,
        "image_size": 224,
        "use_swiglu_ffn": False,
        "layer_norm_eps": 1e-06,
        "layerscale_value": 1.0,
        "qkv_bias": True,
        "hidden_act": "gelu",
    },
    "midnight-12k": {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 224,
        "use_swiglu_ffn": True,
        "layer_norm_eps": 1e-06,
        "layerscale_value": 1.0,
        "qkv_bias": True,
        "hidden_act": "gelu",
    },
}
#: preprocessor_config.json. phikon: owkin/phikon@e9ad8d1 verbatim (no processor type: the config's
#: model_type "vit" gives ViTImageProcessor). phikon-v2: its stated values (shortest_edge 224,
#: resample 3 = bicubic, center crop 224, ImageNet mean/std).
HUB_PREPROCESSORS = {
    "phikon": {"do_normalize": True, "do_resize": True, "size": 224, **IMAGENET},
    "phikon-v2": {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        **IMAGENET,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


def hub_dir(name: str, wdir: Path, out: Path) -> Path:
    """A hub snapshot: the hub config.json (at the test depth), preprocessor_config.json, and the
    model.safetensors pathray wrote."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(wdir / "model.safetensors", out / "model.safetensors")
    cfg = dict(HUB_CONFIGS[name], num_hidden_layers=DEPTH[name])
    (out / "config.json").write_text(json.dumps(cfg))
    if name in HUB_PREPROCESSORS:
        (out / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSORS[name]))
    return out


# --------------------------------------------------------------------------------------
# the cards' recipes: (model, transform of a list of PIL images -> batch, pooling of the output)
# --------------------------------------------------------------------------------------
def _processor(hdir: Path, backend: str):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(hdir, backend=backend)
    return lambda images: processor(images=images, return_tensors="pt")["pixel_values"]


def recipe_phikon(hdir: Path, backend: str = "pil"):
    from transformers import ViTModel

    model = ViTModel.from_pretrained(hdir, add_pooling_layer=False)
    return model, _processor(hdir, backend), lambda out: out.last_hidden_state[:, 0, :]


def recipe_phikon_v2(hdir: Path, backend: str = "pil"):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(hdir)
    return model, _processor(hdir, backend), lambda out: out.last_hidden_state[:, 0, :]


def recipe_midnight(hdir: Path, backend: str = "pil"):
    from torchvision.transforms import v2
    from transformers import AutoModel

    transform = v2.Compose(
        [v2.Resize(224), v2.CenterCrop(224), v2.ToTensor(), v2.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))]
    )

    def extract_classification_embedding(tensor):
        cls_embedding, patch_embeddings = tensor[:, 0, :], tensor[:, 1:, :]
        return torch.cat([cls_embedding, patch_embeddings.mean(1)], dim=-1)

    model = AutoModel.from_pretrained(hdir)
    return (
        model,
        lambda images: torch.stack([transform(im) for im in images]),
        lambda out: extract_classification_embedding(out.last_hidden_state),
    )


RECIPES = {"phikon": recipe_phikon, "phikon-v2": recipe_phikon_v2, "midnight-12k": recipe_midnight}


def _reference(recipe, hdir: Path, tiles: np.ndarray, backend: str = "pil") -> np.ndarray:
    model, transform, pool = recipe(hdir, backend)
    with torch.inference_mode():
        return pool(model.eval()(transform([Image.fromarray(t) for t in tiles]))).float().numpy()


def _tiles(he_tiles: np.ndarray, px: int) -> np.ndarray:
    tiles = np.ascontiguousarray(he_tiles[:N_TILES, :px, :px])
    tiles.flags.writeable = False
    return tiles


def _encoder(name: str, wdir: Path):
    return load_encoder(EncoderConfig(name, weights=str(wdir), device="cpu", batch_size=N_TILES))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "midnight-12k" else n for n in RECIPES]
)
def test_matches_transformers_card(name, random_weights, he_tiles, tmp_path):
    wdir = random_weights(name, num_hidden_layers=DEPTH[name])
    hdir = hub_dir(name, wdir, tmp_path / "hub")
    encoder = _encoder(name, wdir)
    for px in (224, 256):
        tiles = _tiles(he_tiles, px)
        ref = _reference(RECIPES[name], hdir, tiles)
        got = encoder(tiles)
        assert got.shape == (N_TILES, get_spec(name).embed_dim) == ref.shape
        diff = float(np.abs(got - ref).max())
        assert diff <= TOL, f"{name} @ {px}px: max abs diff {diff:.3g}"
        assert float(np.abs(ref).max()) > 1e-2


@pytest.mark.parametrize("name", ["phikon", "phikon-v2"])
def test_default_torchvision_processor(name, random_weights, he_tiles, tmp_path):
    """transformers 5 gives ``AutoImageProcessor`` a torchvision backend by default; the cards
    were written for the PIL one (transformers 4), which the spec reproduces. Both agree on the
    native 224 px tile (no resize); on resized tiles they differ by a grey level on some pixels."""
    wdir = random_weights(name, num_hidden_layers=DEPTH[name])
    hdir = hub_dir(name, wdir, tmp_path / "hub")
    tiles = _tiles(he_tiles, 224)
    ref = _reference(RECIPES[name], hdir, tiles, backend="torchvision")
    assert float(np.abs(_encoder(name, wdir)(tiles) - ref).max()) <= TOL


@pytest.mark.parametrize("name", ["hibou-b", "hibou-l"])
def test_matches_official_hibou_golden(name, random_weights, he_tiles):
    golden = np.load(DATA / f"{name}_golden.npz")
    depth = int(golden["depth"])
    assert depth == DEPTH[name]
    wdir = random_weights(name, seed=int(golden["seed"]), num_hidden_layers=depth)
    assert tensors_sha256(wdir / "model.safetensors") == str(golden["weights_sha256"]), (
        f"random weights changed: regenerate the golden with {GOLDEN_SCRIPT} <HistAI/hibou checkout>"
    )
    encoder = _encoder(name, wdir)
    for px in (224, 256):
        ref = golden[f"embeddings_{px}"]
        got = encoder(_tiles(he_tiles, px)[: len(ref)])
        diff = float(np.abs(got - ref).max())
        assert diff <= TOL, f"{name} @ {px}px: max abs diff {diff:.3g}"
        assert float(np.abs(ref).max()) > 1e-2


def tensors_sha256(path: Path) -> str:
    """As ``hibou_golden.tensors_sha256``: a digest of the tensors, not of the file's bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# release layout, configs, refusal of other checkpoints
# --------------------------------------------------------------------------------------
def test_spec_configs_are_the_hub_configs():
    """Every config value a spec builds from is the hub config.json's (transformers defaults for the rest)."""
    for name in COVERED_MODELS:
        hub = HUB_CONFIGS.get(name) or dict(
            HUB_CONFIGS["hibou-b"], hidden_size=1024, num_hidden_layers=24, num_attention_heads=16
        )
        for key, value in get_spec(name).model_kwargs["config"].items():
            expected = hub.get(key, None)
            if expected is None:  # not in the hub file: transformers' default is what the card gets
                cls = getattr(transformers, get_spec(name).architecture).config_class
                expected = getattr(cls(), key)
            assert value == expected, (name, key)


@pytest.mark.parametrize("name", COVERED_MODELS)
def test_weights_are_written_in_the_hub_layout(name, random_weights):
    """``save_pretrained``'s key names (transformers 4 module names, as on the hub), no prefix."""
    keys = set(load_file(str(random_weights(name, num_hidden_layers=1) / "model.safetensors")))
    assert "encoder.layer.0.attention.attention.query.weight" in keys
    assert "encoder.layer.0.attention.output.dense.weight" in keys
    assert not any("q_proj" in k or "gate_proj" in k for k in keys)
    ffn = {"phikon": "intermediate.dense", "phikon-v2": "mlp.fc1"}.get(name, "mlp.weights_in")
    assert f"encoder.layer.0.{ffn}.weight" in keys
    assert ("embeddings.register_tokens" in keys) == name.startswith("hibou")


def test_builder_release_layout_round_trip():
    builder = get_builder("transformers")
    for name in COVERED_MODELS:
        spec = get_spec(name)
        net = create_model(
            spec.architecture,
            {**spec.model_kwargs, "config": {**spec.model_kwargs["config"], "num_hidden_layers": 1}},
            builder="transformers",
        )
        own = net.state_dict()
        back = builder.from_release(net, builder.to_release(net, dict(own)))
        assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own), name


def test_phikon_checkpoint_with_a_pooler_loads(random_weights, he_tiles, tmp_path):
    """A ViTModel saved with its default pooler carries ``pooler.dense``; the card drops it
    (``add_pooling_layer=False``) and so does pathray."""
    wdir = random_weights("phikon", num_hidden_layers=1)
    sd = load_file(str(wdir / "model.safetensors"))
    sd |= {"pooler.dense.weight": torch.ones(768, 768), "pooler.dense.bias": torch.ones(768)}
    out = tmp_path / "with_pooler"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"))
    shutil.copy(wdir / "config.json", out / "config.json")
    tiles = _tiles(he_tiles, 224)
    np.testing.assert_array_equal(_encoder("phikon", out)(tiles), _encoder("phikon", wdir)(tiles))


def test_hibou_hub_config_names_its_remote_code_class(random_weights, tmp_path):
    """The hub config.json says ``Dinov2ModelWithRegisters`` (trust_remote_code); it is accepted
    as Hibou's architecture, while a config naming another class is refused."""
    wdir = random_weights("hibou-b", num_hidden_layers=1)
    shrunk = {"pathray": json.loads((wdir / "config.json").read_text())["pathray"]}  # depth 1
    hdir = tmp_path / "hub"
    hdir.mkdir()
    shutil.copy(wdir / "model.safetensors", hdir / "model.safetensors")
    (hdir / "config.json").write_text(json.dumps(dict(HUB_CONFIGS["hibou-b"], **shrunk)))
    assert _encoder("hibou-b", hdir).embed_dim == 768
    (hdir / "config.json").write_text(json.dumps(dict(HUB_CONFIGS["phikon-v2"], **shrunk)))
    with pytest.raises(WeightsMismatchError, match="Dinov2Model"):
        _encoder("hibou-b", hdir)


@pytest.mark.parametrize(
    "name,other",
    [
        ("phikon", "hibou-b"),
        ("phikon-v2", "midnight-12k"),
        ("hibou-l", "hibou-b"),
        ("midnight-12k", "phikon-v2"),
        ("hibou-b", "kaiko-vits16"),
    ],
)
def test_other_checkpoint_is_refused(name, other, random_weights, tmp_path):
    """Another model's weights file (its config.json removed, so only the keys and shapes speak)."""
    overrides = {"depth": 1} if other.startswith("kaiko") else {"num_hidden_layers": 1}
    wfile = random_weights(other, **overrides) / "model.safetensors"
    alone = tmp_path / "model.safetensors"
    shutil.copy(wfile, alone)
    with pytest.raises(WeightsMismatchError):
        load_encoder(EncoderConfig(name, weights=str(alone), device="cpu"))


# --------------------------------------------------------------------------------------
# full-size architectures, on the meta device
# --------------------------------------------------------------------------------------
#: exact parameter counts of the full models (cards: Hibou-B "85.7M", Hibou-L "304M params";
#: Phikon ViT-B, Phikon-v2 ViT-L, Midnight ViT-g "1.1B")
FULL_PARAMS = {
    "phikon": 85_798_656,
    "phikon-v2": 303_351_808,
    "midnight-12k": 1_134_771_200,
    "hibou-b": 85_741_056,
    "hibou-l": 303_659_264,
}
#: (blocks, width, heads, patch, prefix tokens incl. registers, tensors in the hub file). Tensors:
#: ViT 4 embedding + 16 per block + 2 final norm; DINOv2 5 (+1 registers) + 18 per block + 2 (the
#: Phikon-v2 439 and Midnight 727 counts are those reported for the published files)
FULL_ARCH = {
    "phikon": (12, 768, 12, 16, 1, 198),
    "phikon-v2": (24, 1024, 16, 16, 1, 439),
    "midnight-12k": (40, 1536, 24, 14, 1, 727),
    "hibou-b": (12, 768, 12, 14, 5, 224),
    "hibou-l": (24, 1024, 16, 14, 5, 440),
}


@pytest.mark.parametrize("name", COVERED_MODELS)
def test_full_architecture_on_meta(name):
    spec = get_spec(name)
    model = create_model(spec.architecture, spec.model_kwargs, meta=True, builder="transformers")
    blocks, width, heads, patch, prefix, tensors = FULL_ARCH[name]
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size) == (
        blocks,
        width,
        heads,
        patch,
    )
    layers = model.layers if hasattr(model, "layers") else model.encoder.layer
    assert len(layers) == blocks
    assert 1 + int(getattr(cfg, "num_register_tokens", 0) or 0) == prefix
    grid = (spec.input_px // patch) ** 2
    assert tuple(model.embeddings.position_embeddings.shape) == (1, 1 + grid, width)
    assert count_params(model) == FULL_PARAMS[name]
    if spec.card_params_m:
        assert round(count_params(model) / 1e6, 1 if spec.card_params_m < 100 else 0) == spec.card_params_m
    release = get_builder("transformers").to_release(model, dict(model.state_dict()))
    assert len(release) == tensors, len(release)
    x = torch.empty(2, 3, spec.input_px, spec.input_px, device="meta")
    with torch.inference_mode():
        pooled = get_builder("transformers").pool(model.eval(), x, spec.pooling)
    assert tuple(pooled.shape) == (2, spec.embed_dim)
