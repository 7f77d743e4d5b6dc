"""What RST covers: every parameter kind, whole transformers models, a vision tower only, a CNN with frozen BN."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_rst import RSTConfig


def _train_and_compare(rst_tools, base, tau, make_batch, loss_fn, steps=3, lr=0.05, **config):
    """Wrap `base` with RST, train it and a plain twin with the manual reset; both must agree bit for bit."""
    reference = rst_tools.twin(base)
    skip = tuple(f"{m}." for m in config.get("modules_to_save") or ())
    manual = rst_tools.ManualRST(reference, tau, targeted=lambda name: not name.startswith(skip))
    model = get_peft_model(base, RSTConfig(tau=tau, **config))
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=lr, momentum=0.9)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = make_batch(g)
        for m, o, after in ((model, opt, None), (reference, ref_opt, manual.reset)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
            if after:
                after()
    rst_tools.assert_reset_invariant(model, tau)
    changed = rst_tools.assert_matches_reference(model, reference)
    assert 0 < changed < sum(p.numel() for p in reference.parameters())
    return model, reference


def test_every_parameter_kind_is_targeted_by_default(rst_tools):
    """Linear, Conv1d/2d, Embedding, LayerNorm, BatchNorm affine, transformers' Conv1D and a bare nn.Parameter."""
    base = rst_tools.MixedNet()
    expected = {n for n, _ in base.named_parameters() if not n.startswith("head.")}
    assert "scale.class_embedding" in expected and "gpt_conv.weight" in expected and "bn.weight" in expected

    def loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    model, reference = _train_and_compare(rst_tools, base, 2e-3, rst_tools.mixed_batch, loss, modules_to_save=["head"])
    assert set(rst_tools.adapter_weights(model)) == expected
    assert set(rst_tools.saved_module_weights(model)) == {"head.weight", "head.bias"}
    # BatchNorm in train mode: running statistics follow the same batches in both models
    bn = model.base_model.model.bn.get_base_layer()
    assert torch.equal(bn.running_mean, reference.bn.running_mean)
    assert torch.equal(bn.running_var, reference.bn.running_var)


VIT_B_16 = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
    projection_dim=512,
)


def test_clip_vit_b16_vision_encoder_fully_covered(rst_tools):
    """All 86,192,640 parameters of the CLIP ViT-B/16 visual encoder incl. projection (paper Appendix C)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        base = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_B_16))
    names = {n for n, _ in base.named_parameters()}
    model = get_peft_model(base, RSTConfig())
    weights = rst_tools.adapter_weights(model)
    assert set(weights) == names
    assert "vision_model.embeddings.class_embedding" in weights
    assert sum(w.numel() for w in weights.values()) == 86_192_640
    assert sum(p.numel() for p in rst_tools.trainable(model)) == 86_192_640
    assert sum(p.numel() for p in rst_tools.base_weights(model).values()) == 86_192_640


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=99,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return CLIPModel(config)


def test_clip_model_vision_tower_only(rst_tools):
    """Targeting the vision tower leaves the text tower and logit_scale untouched (not wrapped, not trained)."""
    base = _tiny_clip()
    vision = {n for n, _ in base.named_parameters() if n.startswith(("vision_model.", "visual_projection."))}
    text_before = {n: p.detach().clone() for n, p in base.named_parameters() if n not in vision}
    assert "logit_scale" in text_before and any(n.startswith("text_model.") for n in text_before)
    tau = 1e-3

    def make_batch(g):
        return torch.randint(0, 99, (3, 7), generator=g), torch.randn(3, 3, 16, 16, generator=g)

    def loss(m, batch):
        out = m(input_ids=batch[0], pixel_values=batch[1])
        return nn.functional.cross_entropy(out.logits_per_image, torch.arange(3))

    reference = rst_tools.twin(base)
    for n, p in reference.named_parameters():
        p.requires_grad_(n in vision)
    model = get_peft_model(base, RSTConfig(tau=tau, target_modules=["vision_model", "visual_projection"]))
    manual = rst_tools.ManualRST(reference, tau, targeted=lambda n: n in vision)
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.05)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = make_batch(g)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss(m, batch).backward()
            o.step()
        manual.reset()

    weights = rst_tools.adapter_weights(model)
    assert set(weights) == vision
    ref_params = dict(reference.named_parameters())
    bases = rst_tools.base_weights(model)
    changed = 0
    for name, w in weights.items():
        assert torch.equal(w, ref_params[name]), name
        changed += int((w != bases[name]).sum())
    assert 0 < changed < sum(w.numel() for w in weights.values())
    for name, before in text_before.items():
        param = bases[name]
        assert rst_tools.bitwise_equal(param, before) and not param.requires_grad, name


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.layer1 = Bottleneck(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.layer1(torch.relu(self.bn(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def _freeze_bn_statistics(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def test_resnet_with_frozen_batchnorm_statistics(rst_tools):
    """The release keeps BN in eval mode: running stats stay, the affine parameters are trained and reset."""
    base = TinyResNet()
    with torch.no_grad():  # non-trivial running statistics, as in a pretrained network
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    stats_before = {n: b.clone() for n, b in base.named_buffers()}
    reference = rst_tools.twin(base)
    tau = 1e-3
    model = get_peft_model(base, RSTConfig(tau=tau, modules_to_save=["fc"]))
    manual = rst_tools.ManualRST(reference, tau, targeted=lambda n: not n.startswith("fc."))
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        for m, o in ((model, opt), (reference, ref_opt)):
            _freeze_bn_statistics(m)
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        manual.reset()

    rst_tools.assert_reset_invariant(model, tau)
    rst_tools.assert_matches_reference(model, reference)
    buffers = {rst_tools.original_name(n): b for n, b in model.base_model.model.named_buffers()}
    buffers = {n: b for n, b in buffers.items() if ".modules_to_save." not in n}
    assert stats_before.keys() <= buffers.keys()
    for name, before in stats_before.items():
        assert torch.equal(buffers[name], before), f"{name} changed although BatchNorm was in eval mode"
    bases = rst_tools.base_weights(model)
    for name, w in rst_tools.adapter_weights(model).items():
        if ".bn" in f".{name}" or name.startswith("bn"):
            assert (w != bases[name]).any(), f"BatchNorm affine parameter {name} was not trained"


def _tiny_transformer(kind: str, tie: bool = False):
    import transformers as tf

    if kind == "bert":
        config = tf.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
        )
        return tf.BertForSequenceClassification(config), ["classifier"]
    if kind == "gpt2":
        config = tf.GPT2Config(
            vocab_size=50,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=tie,
            bos_token_id=0,
            eos_token_id=0,
        )
        return tf.GPT2LMHeadModel(config), None
    config = tf.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    return tf.LlamaForCausalLM(config), None


def _lm_batch(g):
    return torch.randint(1, 50, (2, 8), generator=g), torch.randint(0, 3, (2,), generator=g)


def _lm_loss(m, batch):
    ids, labels = batch
    if "ForSequenceClassification" in type(m.get_base_model() if hasattr(m, "get_base_model") else m).__name__:
        return m(input_ids=ids, labels=labels).loss
    return m(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_tiny_transformers_match_manual_reset(rst_tools, kind):
    base, modules_to_save = _tiny_transformer(kind)
    model, _ = _train_and_compare(
        rst_tools, base, 1e-3, _lm_batch, _lm_loss, steps=3, lr=0.05, modules_to_save=modules_to_save
    )
    if kind == "gpt2":  # transformers' Conv1D is covered
        from transformers.pytorch_utils import Conv1D

        assert any(isinstance(m, Conv1D) for m in model.modules())
        assert "transformer.h.0.attn.c_attn.weight" in rst_tools.adapter_weights(model)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tied_embeddings_stay_tied(rst_tools, kind):
    base, _ = _tiny_transformer(kind, tie=True)
    embed_name = next(n for n, p in base.named_parameters() if p is base.get_input_embeddings().weight)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    tau = 1e-3
    reference = rst_tools.twin(base)
    manual = rst_tools.ManualRST(reference, tau)
    model = get_peft_model(base, RSTConfig(tau=tau))
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        batch = _lm_batch(g)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            _lm_loss(m, batch).backward()
            o.step()
        manual.reset()
    weights = rst_tools.adapter_weights(model)
    tied = reference.get_parameter(embed_name)
    assert torch.equal(weights[embed_name], tied), "input embeddings differ from full fine-tuning of the tied weight"
    assert torch.equal(weights["lm_head.weight"], tied), "output embeddings differ from full fine-tuning"
