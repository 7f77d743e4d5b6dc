"""The CLIP ViT-B/16 vision tower the benchmarks measure on (paper Appendix C: 86,192,640 parameters)."""

from __future__ import annotations

from transformers import CLIPVisionConfig


def vit_b16_config(num_hidden_layers: int = 12) -> CLIPVisionConfig:
    """CLIP ViT-B/16's vision config; fewer layers for the quicker data-loading benchmark."""
    return CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        projection_dim=512,
    )
