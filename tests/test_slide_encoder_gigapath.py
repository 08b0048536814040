"""Prov-GigaPath slide encoder (pathray.slide_level.encoders.gigapath) against two independent references.

1. **Frozen official outputs** (``tests/data/gigapath_slide_golden.npz``). Produced once, outside
   this repository, by running the official code — ``gigapath/slide_encoder.py`` and
   ``gigapath/torchscale`` of github.com/prov-gigapath/prov-gigapath at commit 09d8e87, model
   built by its ``gigapath_slide_enc12l768d(in_chans=1536, max_wsi_size=...)`` — in fp32 on CPU
   with ``random_slide_net(seed=7)``'s weights (loaded with no missing/unexpected key), on tile
   embeddings ``(default_rng(seed).random((N, 1536)) * 2 - 1).astype(float32)`` and the stored
   coordinates, calling ``model(tiles[None], coords[None])`` and ``all_layer_embed=True``.
   Stand-ins there: ``flash_attn_func`` (flash-attn is CUDA-only) replaced by plain softmax
   attention returning ``(out, logsumexp)``, fairscale's unused ``checkpoint_wrapper``/``wrap`` by
   identities, the position table built by the official ``get_2d_sincos_pos_embed_from_grid`` on
   row blocks (same values, less memory), and ``np`` given to the config's ``eval`` (the official
   code writes segment lengths with ``str(list(np.int64 ...))``, which numpy >= 2 prints as
   ``np.int64(1024)``). Case ``default``: the released config, N = 16. Case ``segments1536``:
   ``max_wsi_size=1536``, segment lengths (1024, 430, 181, 76, 32), N = 200, so that sequences
   span several segments that are not multiples of their dilation ratio.
   That run also compared pathray with the official model directly at N = 16, 300, 2100 (released
   config), N = 700 (``segments1536``) and with ``global_pool=True``: max abs diff <= 3e-6.
2. **A literal transcription** of the official forward (:func:`reference_forward`), written
   plainly below with explicit loops over segments and head groups, citing the official lines.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from pathray.demo.synthetic import write_synthetic_svs
from pathray.errors import (
    WeightsCorruptError,
    WeightsMismatchError,
    WeightsUnavailableError,
)
from pathray.slide_level.encoders import GigaPathSlideEncoder, gigapath_coords
from pathray.slide_level.encoders.gigapath import (
    GigaPathSlideNet,
    SlideEncoderConfig,
    random_slide_net,
    write_random_weights,
)
from pathray.slide_level.encoders.longnet import LongNetConfig, segment_lengths
from pathray.store import (
    CommitRequest,
    FeatureStore,
    embeddings_to_arrow,
    feature_schema,
    finalize_slide,
)
from pathray.tiling.grid import TilingConfig, plan_tiles
from pathray.wsi.slide import open_slide

GOLDEN = Path(__file__).parent / "data" / "gigapath_slide_golden.npz"
TOL = 1e-4


# --- the transcription --------------------------------------------------------------------
def reference_pos_embed(cells: np.ndarray, dim: int = 768) -> torch.Tensor:
    """gigapath/pos_embed.py L30-77: table row ``x * 1000 + y`` of ``get_2d_sincos_pos_embed``
    (meshgrid(w, h): the first half encodes the column index = y, the second the row = x)."""

    def one_d(embed_dim, pos):
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=float) / (embed_dim / 2.0))
        out = np.einsum("m,d->md", pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, cells[:, 1]), one_d(dim // 2, cells[:, 0])], axis=1)
    return torch.from_numpy(emb).float()


def reference_dilated_attention(q, k, v, segs, ratios, heads):
    """gigapath/torchscale/component/dilated_attention.py L16-131 (gathering, dense_to_sparse,
    attention_ops via flash_attn_func without mask, sparse_to_dense, scattering) for batch 1:
    ``q, k, v`` are ``(L, H, d)``."""
    length, _, d = q.shape
    outs, lses = [], []
    for sl, dr in zip(segs, ratios):
        seg = min(sl, length)  # L84
        n = math.ceil(length / seg)
        g = math.ceil(seg / dr) * dr  # dense_to_sparse padding, L18-22
        pad = [F.pad(t, (0, 0, 0, 0, 0, n * seg - length)) for t in (q, k, v)]  # L85-88: zeros, unmasked
        out = torch.zeros(n * g, heads, d)
        lse = torch.zeros(n * g, heads)  # sparse_to_dense: zeros -> -1e8, L44-46
        for s in range(n):
            qs, ks, vs = (F.pad(t[s * seg : (s + 1) * seg], (0, 0, 0, 0, 0, g - seg)) for t in pad)
            for group in range(dr):  # head group r2 takes offset r1 == r2, L24-26
                rows = torch.arange(group, g, dr)
                hs = slice(group * heads // dr, (group + 1) * heads // dr)
                qg, kg, vg = (t[rows, hs].transpose(0, 1) for t in (qs, ks, vs))  # (heads of group, rows, d)
                scores = qg @ kg.transpose(1, 2) * d**-0.5
                out[s * g + rows, hs] = (torch.softmax(scores, dim=-1) @ vg).transpose(0, 1)
                lse[s * g + rows, hs] = torch.logsumexp(scores, dim=-1).T
        lse = lse.masked_fill(lse == 0, -1e8)
        outs.append(out[:length])  # L111-114: flatten (n g), cut to L
        lses.append(lse[:length])
    max_lse = torch.stack(lses).max(0)[0]  # L119-129
    weights = [torch.exp(s - max_lse) for s in lses]
    total = torch.stack(weights).sum(0)
    merged = 0
    for o, w in zip(outs, weights):
        merged = merged + o * (w / total)[..., None]
    return merged


def reference_forward(sd, tiles, coords, segs, ratios=(1, 2, 4, 8, 16), heads=16, global_pool=False):
    """gigapath/slide_encoder.py L166-223 (LongNetViT.coords_to_pos / forward) around
    torchscale/architecture/encoder.py L116-162 (pre-norm EncoderLayer) and L327-399 (Encoder),
    component/feedforward_network.py L131-142 (fc1, gelu, sub-LN, fc2); dropout/drop-path off.
    Returns ``(pooled (768,), all-layer pooled (13, 768))``."""

    def ln(x, prefix, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)

    def lin(x, prefix):
        return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])

    cells = np.floor(coords / 256.0)
    x = lin(torch.from_numpy(tiles), "patch_embed.proj") + reference_pos_embed(cells)
    x = torch.cat([sd["cls_token"][0], x])  # pos row 0 of the table is zeros
    states = [x]
    for i in range(len([k for k in sd if k.endswith("self_attn.q_proj.weight")])):
        p = f"encoder.layers.{i}"
        h = ln(x, p + ".self_attn_layer_norm")
        q, k, v = (lin(h, f"{p}.self_attn.{n}_proj").reshape(len(h), heads, -1) for n in "qkv")
        a = reference_dilated_attention(q, k, v, segs, ratios, heads).reshape(len(h), -1)
        x = x + lin(ln(a, p + ".self_attn.inner_attn_ln"), p + ".self_attn.out_proj")
        h = F.gelu(lin(ln(x, p + ".final_layer_norm"), p + ".ffn.fc1"))
        x = x + lin(ln(h, p + ".ffn.ffn_layernorm"), p + ".ffn.fc2")
        states.append(x)

    def pool(state):
        return ln(state[1:].mean(0), "norm", 1e-6) if global_pool else ln(state, "norm", 1e-6)[0]

    return pool(ln(x, "encoder.layer_norm")), torch.stack([pool(s) for s in states])


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("gigapath") / "slide_encoder.pth", seed=7)


@pytest.fixture(scope="module")
def encoder(weights_file) -> GigaPathSlideEncoder:
    return GigaPathSlideEncoder.from_weights(str(weights_file))


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


def golden_tiles(golden, tag):
    n = len(golden[f"{tag}_coords"])
    tiles = (np.random.default_rng(int(golden[f"{tag}_tiles_seed"])).random((n, 1536)) * 2 - 1).astype(np.float32)
    np.testing.assert_array_equal(tiles[0, :8], golden[f"{tag}_tiles_head"])  # same generator stream as then
    return tiles


def net_for(tag, golden, global_pool=False):
    segs = tuple(int(s) for s in golden[f"{tag}_segment_length"])
    assert segs == segment_lengths(int(golden[f"{tag}_max_wsi_size"]), 256)
    config = SlideEncoderConfig(longnet=LongNetConfig(segment_lengths=segs), global_pool=global_pool)
    return random_slide_net(seed=int(golden["weights_seed"]), config=config), segs


# --- equality ----------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["default", "segments1536"])
def test_matches_the_official_implementations_frozen_outputs(golden, tag):
    net, _ = net_for(tag, golden)
    tiles, coords = golden_tiles(golden, tag), golden[f"{tag}_coords"]
    with torch.inference_mode():
        cls, layers = (t.numpy() for t in net(torch.from_numpy(tiles), torch.from_numpy(coords)))
    assert np.abs(cls - golden[f"{tag}_cls"]).max() <= TOL
    assert layers.shape == (13, 768)
    assert np.abs(layers - golden[f"{tag}_all_layers"]).max() <= TOL
    assert np.abs(layers[-1] - cls).max() > 1e-2  # all-layer outputs skip the encoder's output LayerNorm


@pytest.mark.slow  # full-size slide encoder on CPU
def test_transcription_reproduces_the_official_outputs_too(golden):
    """The literal transcription is itself a faithful reference: it gives the frozen official outputs."""
    net, segs = net_for("segments1536", golden)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    with torch.inference_mode():
        cls, layers = reference_forward(sd, golden_tiles(golden, "segments1536"), golden["segments1536_coords"], segs)
    assert np.abs(cls.numpy() - golden["segments1536_cls"]).max() <= TOL
    assert np.abs(layers.numpy() - golden["segments1536_all_layers"]).max() <= TOL


@pytest.mark.slow  # full-size slide encoder on CPU
@pytest.mark.parametrize("global_pool", [False, True])
def test_matches_the_transcription_on_synthetic_coordinates(global_pool):
    """Several segments per branch, segments not a multiple of the dilation, padding included."""
    segs = (64, 45, 23, 17, 16)
    config = SlideEncoderConfig(longnet=LongNetConfig(segment_lengths=segs, depth=3), global_pool=global_pool)
    net = random_slide_net(seed=3, config=config)
    rng = np.random.default_rng(5)
    tiles = (rng.random((90, 1536)) * 2 - 1).astype(np.float32)
    coords = (rng.integers(0, 999, (90, 2)) * 256 + rng.integers(0, 256, (90, 2))).astype(np.float32)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    with torch.inference_mode():
        ref_cls, ref_layers = reference_forward(sd, tiles, coords, segs, global_pool=global_pool)
        cls, layers = net(torch.from_numpy(tiles), torch.from_numpy(coords))
    assert (cls - ref_cls).abs().max() <= TOL
    assert (layers - ref_layers).abs().max() <= TOL


def store_slide(root: Path, grid, tiles: np.ndarray) -> dict[str, np.ndarray]:
    """Write one slide's tiles + embeddings as a committed ``prov-gigapath`` store entry and read
    it back as the aggregate job would: ``{"x", "y", "embedding"}`` in tile order."""
    store = FeatureStore(str(root))
    table = grid.to_table().append_column("embedding", embeddings_to_arrow(tiles))
    store.write_chunk("prov-gigapath", grid.slide_id, "c0", table.cast(feature_schema(1536, pa.float16())))
    finalize_slide(store, CommitRequest("prov-gigapath", grid.slide_id, "demo", ["c0"], len(grid), {}, {}, "h", "r"))
    back = store.dataset("prov-gigapath").to_table().sort_by("tile_index")
    emb = back["embedding"].combine_chunks().flatten().to_numpy().reshape(len(back), -1)
    return {"x": back["x"].to_numpy(), "y": back["y"].to_numpy(), "embedding": emb}


@pytest.mark.slow  # full-size slide encoder on CPU
def test_encoder_on_a_stored_slide_sees_the_official_coordinates(tmp_path, encoder):
    """A real slide at 0.2631 µm/px tiled by pathray and stored: the encoder called with the
    store's level-0 coordinates equals the reference fed the official coordinates (256 x grid index)."""
    mpp = 0.2631
    path = write_synthetic_svs(
        tmp_path / "s.svs", (2900, 2400), mpp=mpp, tissue_rects=((300, 200, 2200, 1900),), downsamples=(1, 4)
    )
    with open_slide(str(path)) as slide:
        grid = plan_tiles(slide, "s", TilingConfig(tile_px=256, target_mpp=0.5, min_tissue_fraction=0.25))
    tiles = (np.random.default_rng(9).random((len(grid), 1536)) * 2 - 1).astype(np.float16)  # stored as float16
    stored = store_slide(tmp_path / "store", grid, tiles)
    step = 256 * 0.5 / mpp
    official = np.stack([np.round(stored["x"] / step), np.round(stored["y"] / step)], 1) * 256  # column/row * 256
    got, got_layers = encoder.embed(stored["embedding"], stored["x"], stored["y"], mpp)
    np.testing.assert_array_equal(got, encoder(stored["embedding"], stored["x"], stored["y"], mpp))
    sd = {k: v.detach() for k, v in encoder.net.state_dict().items()}
    with torch.inference_mode():
        ref_cls, ref_layers = reference_forward(
            sd, tiles.astype(np.float32), official.astype(np.float32), segment_lengths()
        )
    assert got.shape == (768,) and got.dtype == np.float32 and len(grid) >= 12
    assert np.abs(got - ref_cls.numpy()).max() <= TOL
    assert np.abs(got_layers - ref_layers.numpy()).max() <= TOL
    np.testing.assert_array_equal(encoder.all_layers(stored["embedding"], stored["x"], stored["y"], mpp), got_layers)
    assert np.abs(encoder(tiles, grid.x * 2, grid.y * 2, mpp) - got).max() > 1e-3  # positions matter


# --- architecture and weights ------------------------------------------------------------
def test_parameter_count_and_state_dict_on_meta():
    with torch.device("meta"):
        net = GigaPathSlideNet()
    sd = net.state_dict()
    # 1536*768+768 (patch embed) + 768 (CLS) + 12 * 7,095,552 (4 projections, 2 FFN linears, 5 LayerNorms)
    # + 2 * 1536 (encoder.layer_norm, norm): the official model's count, printed by the official code
    assert sum(p.numel() for p in net.parameters()) == 86_330_880
    assert len(sd) == 247 and "pos_embed" not in sd  # the official pos_embed is a non-persistent buffer
    assert tuple(sd["patch_embed.proj.weight"].shape) == (768, 1536)
    assert tuple(sd["cls_token"].shape) == (1, 1, 768)
    layer = {k.split(".", 3)[3]: tuple(v.shape) for k, v in sd.items() if k.startswith("encoder.layers.11.")}
    projections = {
        f"self_attn.{n}_proj.{w}": shape
        for n in ("q", "k", "v", "out")
        for w, shape in (("weight", (768, 768)), ("bias", (768,)))
    }
    assert layer == {
        **projections,
        "self_attn.inner_attn_ln.weight": (768,),
        "self_attn.inner_attn_ln.bias": (768,),
        "self_attn_layer_norm.weight": (768,),
        "self_attn_layer_norm.bias": (768,),
        "ffn.fc1.weight": (3072, 768),
        "ffn.fc1.bias": (3072,),
        "ffn.fc2.weight": (768, 3072),
        "ffn.fc2.bias": (768,),
        "ffn.ffn_layernorm.weight": (3072,),
        "ffn.ffn_layernorm.bias": (3072,),
        "final_layer_norm.weight": (768,),
        "final_layer_norm.bias": (768,),
    }
    assert "encoder.layers.12.ffn.fc1.weight" not in sd and "encoder.layer_norm.weight" in sd and "norm.bias" in sd
    config = net.config.longnet
    assert config.segment_lengths == (1024, 5792, 32768, 185363, 1048576)  # max_wsi_size=262144, tile_size=256
    assert config.dilated_ratios == (1, 2, 4, 8, 16) and config.num_heads == 16


@pytest.mark.slow  # full-size slide encoder on CPU
def test_loads_a_slide_encoder_pth_strictly(weights_file, encoder):
    obj = torch.load(weights_file, weights_only=True)
    assert list(obj) == ["model"]  # the released file's layout
    again = GigaPathSlideEncoder.from_weights(weights_file.parent)  # a directory holding slide_encoder.pth
    rng = np.random.default_rng(1)
    tiles, xy = rng.random((20, 1536)).astype(np.float32), rng.integers(0, 60000, (2, 20))
    np.testing.assert_array_equal(again(tiles, *xy, 0.25), encoder(tiles, *xy, 0.25))
    expected = random_slide_net(seed=7)
    for k, v in expected.state_dict().items():
        assert torch.equal(encoder.net.state_dict()[k], v), k
    prov = encoder.provenance()
    assert prov["architecture"] == "gigapath_slide_enc12l768d"
    assert prov["weights_fingerprint"].startswith("sha256:") and prov["weights"] == str(weights_file)
    assert "0.5" in prov["coordinate_rule"] and prov["segment_lengths"][1] == 5792
    assert prov["weights_fingerprint"] == "sha256:" + hashlib.sha256(weights_file.read_bytes()).hexdigest()


@pytest.mark.slow  # full-size slide encoder on CPU
def test_wrong_files_are_refused(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)["model"]
    missing = {k: v for k, v in state.items() if k != "encoder.layers.3.ffn.fc2.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing keys: encoder\.layers\.3\.ffn\.fc2\.bias"):
        GigaPathSlideEncoder.from_weights(tmp_path / "missing.pth")
    torch.save({"model": {**state, "decoder_embed.weight": torch.zeros(2, 2)}}, tmp_path / "extra.pth")
    with pytest.raises(WeightsMismatchError, match="unexpected keys: decoder_embed.weight"):
        GigaPathSlideEncoder.from_weights(tmp_path / "extra.pth")
    torch.save({"model": {**state, "patch_embed.proj.weight": torch.zeros(768, 1024)}}, tmp_path / "shape.pth")
    with pytest.raises(WeightsMismatchError, match=r"patch_embed\.proj\.weight: checkpoint \(768, 1024\)"):
        GigaPathSlideEncoder.from_weights(tmp_path / "shape.pth")
    tile_encoder_like = {"cls_token": torch.zeros(1, 1, 1536), "pos_embed": torch.zeros(1, 197, 1536)}
    torch.save({"model": tile_encoder_like}, tmp_path / "tile.pth")
    with pytest.raises(WeightsMismatchError) as exc:
        GigaPathSlideEncoder.from_weights(tmp_path / "tile.pth")
    assert exc.value.error_type == "weights_mismatch"
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsCorruptError):
        GigaPathSlideEncoder.from_weights(tmp_path / "junk.pth")
    with pytest.raises(WeightsUnavailableError, match="slide_encoder.pth"):
        GigaPathSlideEncoder.from_weights(tmp_path / "nowhere")


def test_hub_default_without_network_or_cache_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="prov-gigapath/prov-gigapath") as exc:
        GigaPathSlideEncoder.from_weights(None)
    assert "HF_TOKEN" in str(exc.value) and "request access" in str(exc.value)


def test_bad_inputs(encoder):
    tiles = np.zeros((3, 1536), np.float32)
    with pytest.raises(ValueError, match="1536"):
        encoder(np.zeros((3, 1024), np.float32), [0, 1, 2], [0, 1, 2], 0.5)
    with pytest.raises(ValueError, match="3 tile embeddings but 2"):
        encoder(tiles, [0, 1], [0, 1], 0.5)
    with pytest.raises(ValueError, match="outside the 1000 x 1000 grid"):
        encoder(tiles, [0, 1, 256_000], [0, 1, 2], 0.5)
    with pytest.raises(ValueError, match="slide_mpp"):
        encoder(tiles, [0, 1, 2], [0, 1, 2], float("nan"))
    # the 0.5 µm/px pixel holding the centre of the first level-0 pixel
    assert gigapath_coords(np.array([0, 511]), np.array([1023, 0]), 0.25).tolist() == [[0, 511], [255, 0]]
