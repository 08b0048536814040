"""Encoder behaviour: input handling, micro-batching, dtypes, the generic timm entry,
random weights, the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pathray.encoders import EncoderConfig, get_spec, list_models, load_encoder, preprocess_batch, write_random_weights
from pathray.encoders.registry import Preprocess


@pytest.fixture(scope="module")
def vits16(kaiko_vits16_weights):
    return load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu", batch_size=3))


def test_read_only_input_is_untouched(vits16, he_tiles):
    before = he_tiles.copy()
    assert not he_tiles.flags.writeable
    out = vits16(he_tiles[:4])
    assert out.shape == (4, 384) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(he_tiles, before)


def test_micro_batching_matches_one_batch(kaiko_vits16_weights, he_tiles):
    tiles = np.ascontiguousarray(he_tiles[:7, :224, :224])
    one = load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu", batch_size=64))
    many = load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu", batch_size=2))
    np.testing.assert_allclose(one(tiles), many(tiles), atol=1e-5)
    assert one(tiles[:0]).shape == (0, 384)


def test_non_contiguous_and_odd_sizes(vits16, he_tiles):
    strided = he_tiles[:3, ::2, ::2]  # 128 px, non-contiguous view: upsampled to 224
    assert vits16(strided).shape == (3, 384)
    assert vits16(np.ascontiguousarray(he_tiles[:2, :200, :200])).shape == (2, 384)


def test_bad_input(vits16):
    with pytest.raises(ValueError, match="uint8"):
        vits16(np.zeros((2, 224, 224, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        vits16(np.zeros((224, 224, 3), dtype=np.uint8))


def test_output_float16_and_bf16_autocast(kaiko_vits16_weights, he_tiles):
    tiles = np.ascontiguousarray(he_tiles[:3, :224, :224])
    ref = load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu"))(tiles)
    half = load_encoder(
        EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu", output_dtype="float16")
    )(tiles)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), ref, atol=2e-2, rtol=2e-2)
    bf16 = load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu", dtype="bf16"))(
        tiles
    )
    assert bf16.dtype == np.float32
    cos = (bf16 * ref).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99
    fp16 = load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu", dtype="fp16"))(
        tiles
    )
    assert fp16.dtype == np.float32
    np.testing.assert_allclose(fp16, ref, atol=5e-2)


def test_provenance_has_no_secrets(vits16, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    prov = vits16.provenance()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in prov.items())
    assert "hf_secret_value" not in json.dumps(prov)
    assert prov["weights_fingerprint"].startswith("sha256:") and prov["embed_dim"] == "384"


def test_write_random_weights_is_deterministic(tmp_path):
    a = write_random_weights("kaiko-vits16", tmp_path / "a", seed=5, depth=1)
    b = write_random_weights("kaiko-vits16", tmp_path / "b", seed=5, depth=1)
    c = write_random_weights("kaiko-vits16", tmp_path / "c", seed=6, depth=1)
    from safetensors.torch import load_file

    ta, tb, tc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["blocks.0.attn.qkv.weight"], tc["blocks.0.attn.qkv.weight"])
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and cfg["pathray"]["seed"] == 5


def test_session_runs_the_avx2_kernels_the_goldens_were_made_with():
    """conftest pins ATen's CPU kernels to AVX2 before torch is imported, on CPUs that have AVX2
    (the golden weights' bits depend on them); torch imported earlier by anything would ignore
    the pin."""
    if os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        pytest.skip("no AVX2 pin (a CPU without AVX2): the golden weights' digests cannot hold here")
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"


def test_random_weights_for_layer_class_kwargs_roundtrip(random_weights):
    """Virchow2's SwiGLU/SiLU kwargs are not JSON: config.json records them by name and the
    spec supplies the classes when loading."""
    d = random_weights("virchow2", depth=1)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_args"]["reg_tokens"] == 4 and cfg["model_args"]["global_pool"] == ""
    layer_args = cfg["pathray"]["layer_args_from_spec"]
    assert layer_args["act_layer"] == "SiLU" and "GluMlp" in layer_args["mlp_layer"]  # SwiGLUPacked
    enc = load_encoder(EncoderConfig("virchow2", weights=str(d), device="cpu"))
    assert enc.embed_dim == 2560 and enc.model.num_prefix_tokens == 5


def test_generic_timm_entry(tmp_path, he_tiles):
    d = write_random_weights("timm:vit_tiny_patch16_224", tmp_path / "tiny", depth=1)
    enc = load_encoder(EncoderConfig("timm:vit_tiny_patch16_224", weights=str(d), device="cpu"))
    out = enc(np.ascontiguousarray(he_tiles[:2]))
    assert out.shape == (2, 192) and enc.embed_dim == 192
    spec = get_spec("timm:vit_tiny_patch16_224")
    assert spec.preprocess.crop_px == 224 and spec.pooling == "cls" and spec.embed_dim == 192
    assert get_spec("timm:resnet18").embed_dim == 512


@pytest.mark.parametrize(
    "prep",
    [
        Preprocess(resize_px=256, crop_px=224, interpolation="bicubic"),
        Preprocess(resize_px=224, crop_px=224, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3),
        Preprocess(resize_px=224, crop_px=200, interpolation="bicubic"),
    ],
)
@pytest.mark.parametrize("tile_px", [224, 256, 180])
def test_preprocess_bit_identical_to_torchvision_on_pil(prep, tile_px, he_tiles):
    tiles = np.ascontiguousarray(he_tiles[:3, :tile_px, :tile_px])
    mode = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR}
    tf = transforms.Compose(
        [
            transforms.Resize(prep.resize_px, interpolation=mode[prep.interpolation]),
            transforms.CenterCrop(prep.crop_px),
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ]
    )
    ref = torch.stack([tf(Image.fromarray(t)) for t in tiles])
    got = preprocess_batch(torch.from_numpy(tiles), prep)
    assert torch.equal(got, ref)


def test_every_spec_is_complete():
    for name in list_models():
        s = get_spec(name)
        assert s.embed_dim > 0 and s.input_px == s.preprocess.crop_px and s.native_mpp > 0
        assert (s.hf_hub_id or s.weights_url) and s.license and s.family  # CTransPath: Google Drive only


def test_cli_models_table_and_write_random(tmp_path, capsys):
    from pathray.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(list_models())
    assert main(["models", "write-random", "kaiko-vits16", str(tmp_path / "w"), "--depth", "1"]) == 0
    assert (tmp_path / "w" / "model.safetensors").is_file()
    assert main(["models", "write-random", "nope", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_compile_matches_eager(kaiko_vits16_weights, he_tiles):
    pytest.importorskip("torch._inductor")
    tiles = np.ascontiguousarray(he_tiles[:3, :224, :224])  # 2 + a padded partial micro-batch
    eager = load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu"))
    try:
        compiled = load_encoder(
            EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu", compile=True, batch_size=2)
        )
        got = compiled(tiles)
    except Exception as exc:  # noqa: BLE001 - no C++ toolchain for inductor on this machine
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {str(exc)[:200]}")
    np.testing.assert_allclose(got, eager(tiles), atol=1e-4)
