"""Weights without hub access: $PATHRAY_WEIGHTS_DIR, the job YAML's ``weights:`` map, s3://
weights copied once per node, and the error a missing gated model gives."""

from __future__ import annotations

import numpy as np
import pytest

from pathray.encoders import EncoderConfig, load_encoder
from pathray.errors import WeightsUnavailableError
from pathray.job.config import build_job_config, model_record

BASE = {"manifest": "m.csv", "out": "store"}


def test_weights_dir_env_gives_each_model_its_folder(tmp_path, monkeypatch, random_weights):
    src = random_weights("kaiko-vits16", depth=1)
    (tmp_path / "kaiko-vits16").symlink_to(src, target_is_directory=True)
    monkeypatch.setenv("PATHRAY_WEIGHTS_DIR", str(tmp_path))
    cfg = build_job_config({**BASE, "models": "kaiko-vits16,kaiko-vits8"})
    assert cfg.encoders["kaiko-vits16"].weights == str(tmp_path / "kaiko-vits16")
    assert cfg.encoders["kaiko-vits8"].weights is None  # no folder: the hub, as before
    encoder = load_encoder(cfg.encoders["kaiko-vits16"])
    assert encoder(np.zeros((1, 224, 224, 3), np.uint8)).shape == (1, 384)
    assert model_record("kaiko-vits16", cfg.encoders["kaiko-vits16"])["weights"].startswith("sha256:")


def test_yaml_weights_map_wins_over_the_folder_and_is_checked(tmp_path, monkeypatch):
    (tmp_path / "kaiko-vits16").mkdir()
    monkeypatch.setenv("PATHRAY_WEIGHTS_DIR", str(tmp_path))
    cfg = build_job_config({**BASE, "models": ["kaiko-vits16"], "weights": {"kaiko-vits16": "/mnt/w/k"}})
    assert cfg.encoders["kaiko-vits16"].weights == "/mnt/w/k"
    explicit = build_job_config(
        {
            **BASE,
            "models": ["kaiko-vits16"],
            "weights": {"kaiko-vits16": "/mnt/w/k"},
            "encoders": {"kaiko-vits16": {"weights": "/x"}},
        }
    )
    assert explicit.encoders["kaiko-vits16"].weights == "/x"
    with pytest.raises(ValueError, match="not among the run's models"):
        build_job_config({**BASE, "models": ["kaiko-vits16"], "weights": {"uni": "/mnt/w/uni"}})


def test_missing_gated_model_says_how_to_get_it_and_how_to_run_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("PATHRAY_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder(EncoderConfig("uni", device="cpu"))
    text = str(info.value)
    for needle in ("MahmoodLab/UNI", "gated", "request access", "PATHRAY_WEIGHTS_DIR", "weights:", "s3://"):
        assert needle in text, (needle, text)


@pytest.mark.slow
@pytest.mark.s3
def test_s3_weights_are_copied_once_and_identified_by_etag(s3_server, s3_bucket, tmp_path, monkeypatch, random_weights):
    src = random_weights("kaiko-vits16", depth=1)
    for f in ("config.json", "model.safetensors"):
        s3_server.fs.put(str(src / f), f"{s3_bucket}/weights/kaiko-vits16/{f}")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATHRAY_WEIGHTS_CACHE", str(tmp_path / "cache"))
    url = f"s3://{s3_bucket}/weights/kaiko-vits16"
    cfg = build_job_config({**BASE, "models": ["kaiko-vits16"], "weights": {"kaiko-vits16": url}})
    record = model_record("kaiko-vits16", cfg.encoders["kaiko-vits16"])
    assert record["weights"].startswith("etag:")
    tiles = np.zeros((2, 224, 224, 3), np.uint8)
    first = load_encoder(cfg.encoders["kaiko-vits16"])
    local = load_encoder(EncoderConfig("kaiko-vits16", weights=str(src), device="cpu"))
    np.testing.assert_array_equal(first(tiles), local(tiles))
    assert first.weights_source == url and first.weights_fingerprint == record["weights"]
    copies = list((tmp_path / "cache").iterdir())
    assert len(copies) == 1 and sorted(p.name for p in copies[0].iterdir()) == ["config.json", "model.safetensors"]
    load_encoder(cfg.encoders["kaiko-vits16"])  # the second load uses the copy
    assert list((tmp_path / "cache").iterdir()) == copies
