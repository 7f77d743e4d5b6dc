"""CLIPAdaptationModel: release head, cached zero-shot teacher, save/load, bad input."""

import pytest
import torch
import torch.nn.functional as F
from tiny_clip_models import CharTokenizer, tiny_clip
from torch import nn
from transformers import AutoModelForImageClassification, CLIPVisionModel

from cmkd.model import CLIPAdaptationConfig, CLIPAdaptationModel, build_prompts, format_class_name

NAMES = ["Big_Cat", "dog", "bird"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture()
def model(clip):
    torch.manual_seed(1)
    return CLIPAdaptationModel.from_clip(clip, NAMES, "a photo of a {}.", tokenizer=CharTokenizer())


def test_prompts_lowercase_and_replace_underscores():
    assert format_class_name("Big_Cat") == "big cat"
    assert build_prompts(["Big_Cat", "dog"], ["a photo of a {}.", "art of the {}"]) == [
        ["a photo of a big cat.", "art of the big cat"],
        ["a photo of a dog.", "art of the dog"],
    ]


def test_teacher_is_clip_zero_shot(clip, model):
    """Teacher logits == CLIPModel's logits_per_image for the class prompts (the reference is CLIP itself)."""
    torch.manual_seed(2)
    pixels = torch.randn(5, 3, 32, 32)
    prompts = ["a photo of a big cat.", "a photo of a dog.", "a photo of a bird."]
    with torch.no_grad():
        reference = clip(pixel_values=pixels, **CharTokenizer()(prompts)).logits_per_image
        model.eval()
        out = model(pixel_values=pixels)
    torch.testing.assert_close(out.teacher_logits, reference, atol=1e-4, rtol=1e-4)
    assert model.logit_scale.item() == pytest.approx(clip.logit_scale.item())


def test_prompt_ensemble_is_normalised_mean(clip):
    templates = ["a photo of a {}.", "art of the {}"]
    model = CLIPAdaptationModel.from_clip(clip, NAMES, templates, tokenizer=CharTokenizer())
    with torch.no_grad():
        per_template = [
            F.normalize(clip.get_text_features(**CharTokenizer()(col)).pooler_output, dim=-1)
            for col in zip(*build_prompts(NAMES, templates))
        ]
    expected = F.normalize(sum(per_template) / 2, dim=-1)
    torch.testing.assert_close(model.text_features, expected, atol=1e-6, rtol=1e-5)


def test_student_logits_follow_release_head(model):
    """head = BatchNorm1d (batch statistics in train mode, bias 0) -> LayerNorm(eps 1e-6) -> Linear without bias."""
    torch.manual_seed(3)
    pixels = torch.randn(6, 3, 32, 32)
    model.train()
    out = model(pixel_values=pixels)
    feats = out.image_embeds.detach()
    bn = (feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=False) + 1e-5) * model.head.batch_norm.weight
    ln = (bn - bn.mean(1, keepdim=True)) / torch.sqrt(bn.var(1, unbiased=False, keepdim=True) + 1e-6)
    ln = ln * model.head.layer_norm.weight + model.head.layer_norm.bias
    torch.testing.assert_close(out.logits, ln @ model.head.classifier.weight.t(), atol=1e-5, rtol=1e-4)


def test_head_init_and_frozen_batchnorm_bias(clip):
    config_kwargs = dict(class_names=[f"c{i}" for i in range(40)])
    model = CLIPAdaptationModel.from_clip(clip, config_kwargs["class_names"], tokenizer=CharTokenizer())
    head = model.head
    assert head.classifier.bias is None
    assert head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.25)
    assert torch.equal(head.batch_norm.weight, torch.ones(16))
    assert "bias" not in dict(head.batch_norm.named_parameters())
    assert torch.equal(head.batch_norm.bias, torch.zeros(16))
    assert head.layer_norm.eps == 1e-6


def test_only_vision_tower_and_head_are_parameters(model):
    names = [n for n, _ in model.named_parameters()]
    assert all("." in n for n in names), "no bare parameter on the top-level module (RST cannot target those)"
    assert {n.split(".")[0] for n in names} == {"vision_model", "visual_projection", "head"}
    assert {"text_features", "logit_scale"} <= {n for n, _ in model.named_buffers()}


def test_segments_normalise_like_separate_forwards(model):
    torch.manual_seed(4)
    a, b = torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)
    model.train()
    joint = model(pixel_values=torch.cat([a, b]), segment_sizes=[4, 3])
    separate = torch.cat([model(pixel_values=a).logits, model(pixel_values=b).logits])
    torch.testing.assert_close(joint.logits, separate, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="segment_sizes"):
        model(pixel_values=torch.cat([a, b]), segment_sizes=[4, 4])


def test_batchnorm_in_the_tower_stays_frozen_while_training(model):
    model.vision_model.extra_norm = nn.BatchNorm2d(3)  # stands in for a CNN tower's BatchNorm layers
    model.train()
    assert model.training and model.head.batch_norm.training
    assert not model.vision_model.extra_norm.training
    model.config.freeze_vision_batchnorm = False
    model.train()
    assert model.vision_model.extra_norm.training


def test_save_and_load_roundtrip_keeps_teacher(model, tmp_path):
    torch.manual_seed(5)
    pixels = torch.randn(3, 3, 32, 32)
    model.eval()
    before = model(pixel_values=pixels)
    model.save_pretrained(tmp_path)
    loaded = CLIPAdaptationModel.from_pretrained(tmp_path).eval()
    after = loaded(pixel_values=pixels)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.teacher_logits, before.teacher_logits)
    assert loaded.config.class_names == NAMES and loaded.config.id2label[0] == "Big_Cat"
    assert loaded.config.prompt_templates == ["a photo of a {}."]
    auto = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(auto, CLIPAdaptationModel)


def test_labels_give_cross_entropy(model):
    torch.manual_seed(6)
    out = model.eval()(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])))


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_class_lists_and_templates(clip):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="class_names is empty"):
        CLIPAdaptationModel.from_clip(clip, [], tokenizer=tok)
    with pytest.raises(ValueError, match="same prompt word"):
        CLIPAdaptationModel.from_clip(clip, ["big_cat", "Big cat"], tokenizer=tok)
    with pytest.raises(TypeError, match="list of strings"):
        CLIPAdaptationModel.from_clip(clip, "cat", tokenizer=tok)
    with pytest.raises(ValueError, match="placeholder"):
        CLIPAdaptationModel.from_clip(clip, NAMES, "a photo", tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        CLIPAdaptationModel.from_clip(clip, NAMES)
    with pytest.raises(ValueError, match="class_names is required"):
        CLIPAdaptationModel(CLIPAdaptationConfig())


def test_clip_without_projection_is_rejected(clip):
    vision_only = CLIPVisionModel(clip.config.vision_config)
    with pytest.raises(ValueError, match="visual_projection.*joint space"):
        CLIPAdaptationModel.from_clip(vision_only, NAMES, tokenizer=CharTokenizer())


def test_wrong_pixel_shapes_are_rejected(model):
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(pixel_values=torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(pixel_values=torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects \(32, 32\)"):
        model(pixel_values=torch.randn(2, 3, 24, 24))


def test_teacher_needs_cached_text_features():
    config = CLIPAdaptationConfig(vision_config=tiny_clip().config.vision_config, projection_dim=16, class_names=NAMES)
    model = CLIPAdaptationModel(config).eval()
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).teacher_logits is None
    with pytest.raises(RuntimeError, match="from_clip"):
        model.teacher_logits(torch.randn(2, 16))


def test_text_tower_runs_only_while_building(clip):
    calls = []
    handle = clip.text_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        model = CLIPAdaptationModel.from_clip(clip, NAMES, tokenizer=CharTokenizer())
        assert len(calls) == 1  # one batched pass over the prompts
        model.train()(pixel_values=torch.randn(2, 3, 32, 32)).logits.sum().backward()
        model.eval()(pixel_values=torch.randn(2, 3, 32, 32))
        assert len(calls) == 1
    finally:
        handle.remove()
