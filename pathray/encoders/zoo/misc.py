"""Models of several families whose networks pathray writes itself (``module`` builder):
CTransPath (also CHIEF's tile encoder), MUSK, KEEP."""

from __future__ import annotations

from ..spec import EncoderSpec, Preprocess

_CTRANSPATH_SOURCE = ("github.com/Xiyue-Wang/TransPath ctran.py + get_features_CTransPath.py (identical in"
                      " github.com/hms-dbmi/CHIEF models/ctran.py, Get_CHIEF_patch_feature.py); modified timm 0.5.4"
                      " (PyPI timm-ctp 0.5.4: stock timm 0.5.4 + SwinTransformer(embed_layer=...))")

SPECS: list[EncoderSpec] = [
    EncoderSpec(
        name="ctranspath",
        family="Swin-T with convolutional stem (CTransPath)",
        architecture="ctranspath_swin_tiny",
        model_kwargs=dict(img_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          mlp_ratio=4.0),
        builder="module",
        pooling="model",
        embed_dim=768,
        input_px=224,
        native_mpp=1.0,
        native_tile_px=224,
        tile_source="TransPath README: \"It is recommended to first try to extract features at 1.0mpp\";"
                    " get_features_CTransPath.py: transforms.Resize(224) (no crop), so 224-px tiles are fed as is",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear"),
        hf_hub_id=None,
        gated=False,
        weights_url="https://drive.google.com/file/d/1DoDx_70_TLj98gTf6YTXnu4tFhsFocDX/view",
        license="GPL-3.0 (TransPath README: non-commercial academic purposes); CHIEF weights: AGPL-3.0 repo, on request",
        card_params_m=27.5,
        source=_CTRANSPATH_SOURCE,
        notes="weights: ctranspath.pth ({'model': state_dict}, TransPath README Google Drive link) or CHIEF's"
              " CHIEF_CTransPath.pth (same layout; CHIEF README); pass weights=<file>. Embedding: mean of the 7x7"
              " final tokens after LayerNorm (model.head = nn.Identity()). TRIDENT tiles it at 0.5 µm/px by default",
    ),
]
