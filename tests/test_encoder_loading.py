"""Weight loading: local hub-layout dir, single files, pickles via weights_only, corrupt and
mismatched checkpoints, the hub without network, unknown names."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pathray.encoders import EncoderConfig, file_sha256, get_spec, list_models, load_encoder, write_random_weights
from pathray.encoders.encoder import build_model
from pathray.encoders.loading import load_weights
from pathray.errors import (
    EncoderError,
    UnknownModelError,
    WeightsCorruptError,
    WeightsMismatchError,
    WeightsUnavailableError,
)

TILES = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
TINY = "timm:vit_tiny_patch16_224"  # full-size (12 blocks) but small: single files carry no config


def _load(weights, model=TINY):
    return load_encoder(EncoderConfig(model, weights=str(weights), device="cpu"))


def _embed(weights, model=TINY) -> np.ndarray:
    return _load(weights, model)(TILES)


def _assert_same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def full_tiny(random_weights) -> Path:
    """A full-depth ViT-Ti through the generic timm entry."""
    return random_weights(TINY, seed=3)


# --- local directory and files ---------------------------------------------------------
def test_local_dir_rebuilds_shrunk_model_and_fingerprints_file(kaiko_vits16_weights):
    enc = load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cpu"))
    assert len(enc.model.blocks) == 2 and enc.embed_dim == 384
    assert enc.weights_fingerprint == "sha256:" + file_sha256(kaiko_vits16_weights / "model.safetensors")
    prov = enc.provenance()
    json.dumps(prov)
    assert prov["weights_fingerprint"] == enc.weights_fingerprint and prov["model"] == "kaiko-vits16"
    cfg = json.loads((kaiko_vits16_weights / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch16_224" and cfg["model_args"]["depth"] == 2


def test_single_safetensors_file_without_config(full_tiny, tmp_path):
    lone = tmp_path / "tiny.safetensors"
    shutil.copy(full_tiny / "model.safetensors", lone)
    a, b = _load(full_tiny), _load(lone)
    _assert_same_weights(a, b)
    np.testing.assert_array_equal(a(TILES), b(TILES))
    assert b.weights_fingerprint == a.weights_fingerprint  # same bytes, same sha256


def test_file_in_hub_dir_uses_its_config(kaiko_vits16_weights):
    a = _load(kaiko_vits16_weights, "kaiko-vits16")
    b = _load(kaiko_vits16_weights / "model.safetensors", "kaiko-vits16")
    _assert_same_weights(a, b)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_weights_only_pickle_checkpoints(full_tiny, tmp_path, wrap):
    sd = load_file(str(full_tiny / "model.safetensors"))
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "module_prefix": {"module." + k: v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / "checkpoint.pth"
    torch.save(obj, path)
    _assert_same_weights(_load(full_tiny), _load(path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    with pytest.raises(WeightsCorruptError, match="weights_only"):
        _embed(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_corrupt_file(tmp_path, full_tiny, suffix):
    good = (full_tiny / "model.safetensors").read_bytes()
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(good[: len(good) // 3] if suffix == ".safetensors" else b"\x00garbage" * 100)
    with pytest.raises(WeightsCorruptError) as exc:
        _embed(path)
    assert exc.value.error_type == "weights_corrupt" and str(path) in str(exc.value)


def test_corrupt_config_json(tmp_path, kaiko_vits16_weights):
    d = tmp_path / "w"
    shutil.copytree(kaiko_vits16_weights, d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsCorruptError, match="config.json"):
        _embed(d)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(WeightsCorruptError, match="safetensors"):
        _embed(path)


def test_missing_weights(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        _embed(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match="model.safetensors"):
        _embed(tmp_path / "empty")


def test_depth_mismatch_names_missing_keys(tmp_path, kaiko_vits16_weights):
    lone = tmp_path / "shrunk.safetensors"  # depth-2 weights, no config: the full 12-block model
    shutil.copy(kaiko_vits16_weights / "model.safetensors", lone)
    with pytest.raises(WeightsMismatchError) as exc:
        _embed(lone, "kaiko-vits16")
    msg = str(exc.value)
    assert "missing keys" in msg and "blocks.2." in msg and exc.value.error_type == "weights_mismatch"


def test_shape_mismatch_names_keys(tmp_path, full_tiny):
    lone = tmp_path / "tiny.safetensors"
    shutil.copy(full_tiny / "model.safetensors", lone)
    with pytest.raises(WeightsMismatchError) as exc:  # ViT-Ti weights for the ViT-S model
        _embed(lone, model="timm:vit_small_patch16_224")
    msg = str(exc.value)
    assert "shape mismatches" in msg and "blocks.0.mlp.fc2.weight: checkpoint (192, 768) vs model (384, 1536)" in msg


def test_config_for_another_architecture_is_refused(full_tiny):
    # registered models too: a config.json naming another architecture is a mismatch
    with pytest.raises(WeightsMismatchError, match="config.json says architecture 'vit_tiny_patch16_224'"):
        _embed(full_tiny, model="kaiko-vits16")
    with pytest.raises(WeightsMismatchError, match="use timm:vit_tiny_patch16_224"):
        _embed(full_tiny, model="timm:vit_small_patch16_224")


def test_unexpected_keys_named(tmp_path, full_tiny):
    sd = load_file(str(full_tiny / "model.safetensors"))
    sd["head.extra.weight"] = torch.zeros(2, 2)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys: head\.extra\.weight"):
        _embed(path)


def test_pos_embed_for_another_grid_is_refused_without_a_card_reason(tmp_path, full_tiny):
    """timm's checkpoint filter would resample it silently; pathray loads weights as they are."""
    from timm.layers import resample_abs_pos_embed

    sd = load_file(str(full_tiny / "model.safetensors"))
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (20, 20), num_prefix_tokens=1)
    path = tmp_path / "grid20.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsMismatchError, match=r"pos_embed: checkpoint \(1, 401, 192\) vs model \(1, 197, 192\)"):
        _embed(path)


def test_card_prescribed_pos_embed_resampling_is_applied_and_named(tmp_path):
    """kaiko ViT-L/14 is released at 518 px (37x37 grid) and used at 224 px (16x16) by its
    card's loader: pathray resamples as timm does there, and says so in provenance."""
    from timm.layers import resample_abs_pos_embed

    src = write_random_weights("kaiko-vitl14", tmp_path / "l14", depth=1)
    sd = load_file(str(src / "model.safetensors"))
    at_224 = sd["pos_embed"]
    sd["pos_embed"] = resample_abs_pos_embed(at_224, (37, 37), num_prefix_tokens=0)
    save_file(sd, str(src / "model.safetensors"))
    enc = load_encoder(EncoderConfig("kaiko-vitl14", weights=str(src), device="cpu"))
    expected = resample_abs_pos_embed(
        sd["pos_embed"], (16, 16), num_prefix_tokens=0, interpolation="bicubic", antialias=True
    )
    assert torch.equal(enc.model.state_dict()["pos_embed"], expected)
    assert "pos_embed resampled from a 37x37 to a 16x16 grid" in enc.provenance()["weights_adaptations"]


def test_other_architecture_weights_never_load_even_if_shapes_could_be_resampled(tmp_path, random_weights):
    """The reported defect: kaiko ViT-S/16 weights passed as kaiko-vits8 were resampled by
    timm's filter (16x16 kernel -> 8x8) and committed as ok. No config.json here, so only the
    state dict's shapes can tell."""
    vits16 = random_weights("kaiko-vits16", seed=5)
    lone = tmp_path / "vits16.safetensors"
    shutil.copy(vits16 / "model.safetensors", lone)
    with pytest.raises(WeightsMismatchError) as exc:
        load_encoder(EncoderConfig("kaiko-vits8", weights=str(lone), device="cpu"))
    assert "patch_embed.proj.weight: checkpoint (384, 3, 16, 16) vs model (384, 3, 8, 8)" in str(exc.value)
    with pytest.raises(WeightsMismatchError, match="config.json says architecture 'vit_small_patch16_224'"):
        load_encoder(EncoderConfig("kaiko-vits8", weights=str(vits16), device="cpu"))


def one_narrow_block(name: str) -> dict:
    """Overrides that shrink a registered model to one block of width 48 (transformers specs take
    their config's names: at full size Midnight-12k's file alone is 4.5 GB)."""
    if get_spec(name).builder == "transformers":
        return {"num_hidden_layers": 1, "hidden_size": 48, "intermediate_size": 96}
    # GenBio-PathFM's 2-D RoPE needs a head width divisible by 4 (24 heads: width 96)
    return {"depth": 1, "embed_dim": 96 if name == "genbio-pathfm" else 48}


@pytest.mark.slow  # every registered model against every other one's weights
def test_no_registered_model_loads_another_ones_weights(tmp_path):
    """Every registered model against every other's weights (small random weights of each
    exact architecture, shrunk to one block of width 48): only the diagonal loads, and the
    embeddings of one release (same network, same hub repo) share its weights."""
    names = [m for m in list_models() if not m.startswith("timm:")]
    for name in names:
        write_random_weights(name, tmp_path / name, **one_narrow_block(name))
    loaded = set()
    for model in names:
        spec = get_spec(model)
        for weights in names:
            try:
                build_model(spec, load_weights(spec, str(tmp_path / weights)))
                loaded.add((model, weights))
            except WeightsMismatchError:
                pass
    # two embeddings of one release (musk / musk-cls: same network and hub repo) share its weights
    same_release = {
        (a, b)
        for a in names
        for b in names
        if (get_spec(a).architecture, get_spec(a).hf_hub_id) == (get_spec(b).architecture, get_spec(b).hf_hub_id)
        and get_spec(a).hf_hub_id
    }
    assert loaded == {(n, n) for n in names} | same_release


# --- hub ---------------------------------------------------------------------------------
@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_without_network_fails_fast(empty_hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as exc:
        load_encoder(EncoderConfig("uni2-h", device="cpu"))
    assert time.monotonic() - t0 < 10
    msg = str(exc.value)
    assert "unreachable" in msg and "MahmoodLab/UNI2-h" in msg and "HF_TOKEN" in msg and "request access" in msg
    assert "PATHRAY_WEIGHTS_DIR=DIR" in msg and "--weights <model>=SOURCE" in msg


def test_hub_blackholed_network_times_out(empty_hf_cache, monkeypatch):
    """An endpoint that accepts connections but never answers (a black hole): the probe gives
    up after PATHRAY_HUB_TIMEOUT seconds instead of huggingface_hub's retries."""
    from huggingface_hub import constants

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # never accept()ed, never answered
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{hole.getsockname()[1]}")
        monkeypatch.setenv("PATHRAY_HUB_TIMEOUT", "1")
        t0 = time.monotonic()
        with pytest.raises(WeightsUnavailableError, match="unreachable"):
            load_encoder(EncoderConfig("kaiko-vits16", weights="hf-hub:someone/some-model", device="cpu"))
        assert time.monotonic() - t0 < 8
    finally:
        hole.close()


def test_hub_offline_env(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        load_encoder(EncoderConfig("virchow2", device="cpu"))


def test_hub_snapshot_in_local_cache_loads_offline(empty_hf_cache, monkeypatch, kaiko_vits16_weights):
    """Offline clusters with a pre-populated HF cache: the hub id resolves from the cache and the
    fingerprint is the snapshot's commit sha."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "models--someorg--vits16"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(kaiko_vits16_weights / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    enc = load_encoder(EncoderConfig("kaiko-vits16", weights="hf-hub:someorg/vits16", device="cpu"))
    assert enc.weights_fingerprint == f"hf:someorg/vits16@{sha}"
    assert enc.provenance()["weights_source"] == "hf-hub:someorg/vits16"
    _assert_same_weights(enc, _load(kaiko_vits16_weights, "kaiko-vits16"))


# --- names ---------------------------------------------------------------------------------
def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as exc:
        get_spec("uni3")
    msg = str(exc.value)
    for name in list_models():
        assert name in msg
    assert exc.value.error_type == "unknown_model"
    with pytest.raises(KeyError):
        load_encoder(EncoderConfig("not-a-model"))


def test_unknown_timm_architecture():
    with pytest.raises(UnknownModelError, match="timm"):
        get_spec("timm:vit_nonexistent_patch99")


def test_bad_config_values():
    with pytest.raises(ValueError):
        EncoderConfig("uni", dtype="int8")
    with pytest.raises(ValueError):
        EncoderConfig("uni", output_dtype="float64")


def test_cuda_requested_without_cuda(kaiko_vits16_weights):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(EncoderError, match="CUDA"):
        load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights), device="cuda"))


def test_random_weights_files_are_byte_identical_for_the_same_seed(tmp_path):
    """The weights fingerprint is the file's sha256: two writes of one model and seed must give
    the same bytes (safetensors writes a metadata map of several entries in hash order)."""
    from pathray.encoders import file_sha256, write_random_weights

    digests = {
        file_sha256(write_random_weights("kaiko-vits16", tmp_path / f"w{i}", seed=3, depth=1) / "model.safetensors")
        for i in range(3)
    }
    assert len(digests) == 1
