"""Tiny offline CLIP pieces shared by the cmkd tests (no Hub: a character tokenizer and a 1-layer CLIP)."""

import torch
from transformers import CLIPConfig, CLIPModel


class CharTokenizer:
    """Offline stand-in for the CLIP tokenizer: characters -> ids, EOS (99) last, zero padding."""

    def __call__(self, texts, padding=True, truncation=True, return_tensors="pt"):
        ids = [[3 + (ord(c) % 90) for c in t][:14] + [99] for t in texts]
        width = max(map(len, ids))
        mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
        ids = [i + [0] * (width - len(i)) for i in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def tiny_clip(seed: int = 0, projection_dim: int = 16) -> CLIPModel:
    torch.manual_seed(seed)
    text = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        eos_token_id=99,
        pad_token_id=0,
        bos_token_id=98,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    return CLIPModel(config).eval()
