"""The tiny CLIP vision tower the deployment, hotswap and transformers-integration tests share (one copy)."""

from transformers import CLIPVisionConfig


def tiny_clip_vision_config() -> CLIPVisionConfig:
    """2 layers, width 32, 16 px images in 8 px patches: small enough for many adapters per test."""
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=16,
    )
