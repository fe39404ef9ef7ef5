"""Feature taps: every supported family reduces to (B, C, H, W) stage maps of known shapes."""

import pytest
import timm
import torch
from conftest import IMAGE_SIZE, build, labels_kwargs, resnet_config, vit_config
from torch import nn
from transformers import (
    ConvNextConfig,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    DonutSwinConfig,
    DonutSwinForImageClassification,
    FocalNetConfig,
    FocalNetForImageClassification,
    LevitConfig,
    LevitForImageClassification,
    LevitForImageClassificationWithTeacher,
    PPLCNetConfig,
    PPLCNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    Swinv2Config,
    Swinv2ForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

from hf_udkd.taps import FeatureTap, default_layers, run_model
from hf_udkd.teacher import Teacher

X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
X64 = torch.randn(2, 3, 64, 64)


def shapes(tap: FeatureTap) -> list[tuple[int, int, int]]:
    return [(s.channels, s.height, s.width) for s in tap.stages]


def test_resnet_taps_every_stage_after_the_stem(tmp_path):
    model = build(resnet_config([8, 16, 32, 64]), tmp_path)
    tap = FeatureTap.from_probe(model, X)
    assert tap.layers == [1, 2, 3, 4]
    assert shapes(tap) == [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)]
    assert [s.reduction for s in tap.stages] == [4, 8, 16, 32]
    out = tap(model, X)
    assert out.logits.shape == (2, 10)
    assert [tuple(m.shape) for m in out.stages] == [(2, *s) for s in shapes(tap)]


def test_convnext_taps(tmp_path):
    model = build(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], **labels_kwargs()), tmp_path)
    tap = FeatureTap.from_probe(model, X)
    assert shapes(tap) == [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)]


def test_vit_drops_cls_and_reshapes_patches(tmp_path):
    model = build(vit_config(num_hidden_layers=8), tmp_path)
    tap = FeatureTap.from_probe(model, X)
    # 4 evenly spaced layers of 8, the last included; hidden_states[0] is the embedding output.
    assert tap.layers == [2, 4, 6, 8]
    assert shapes(tap) == [(64, 8, 8)] * 4
    out = tap(model, X)
    tokens = model(pixel_values=X, output_hidden_states=True).hidden_states[8]
    # Patch token p sits at (p // 8, p % 8) of the map; token 0 is CLS and is dropped.
    assert torch.equal(out.stages[-1][:, :, 0, 1], tokens[:, 2])
    assert torch.equal(out.stages[-1][:, :, 7, 7], tokens[:, 64])


def test_deit_drops_both_prefix_tokens(tmp_path):
    config = DeiTConfig(image_size=IMAGE_SIZE, patch_size=4, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=64, **labels_kwargs())
    model = DeiTForImageClassificationWithTeacher(config)
    tap = FeatureTap.from_probe(model, X)
    tokens = model(pixel_values=X, output_hidden_states=True).hidden_states[4]
    assert tokens.shape[1] == 66  # CLS + distillation + 64 patches
    assert torch.equal(tap(model, X).stages[-1][:, :, 0, 0], tokens[:, 2])


SWIN_KWARGS = dict(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                   window_size=2, **labels_kwargs())


@pytest.mark.parametrize(
    "config_class, model_class",
    [
        (SwinConfig, SwinForImageClassification),
        (Swinv2Config, Swinv2ForImageClassification),
        (DonutSwinConfig, DonutSwinForImageClassification),
    ],
)
def test_swin_family_taps_the_stages_before_downsampling(config_class, model_class):
    # As transformers' SwinBackbone: the stride-4 stage is tapped, 4 levels at /4, /8, /16, /32.
    torch.manual_seed(0)
    model = model_class(config_class(**SWIN_KWARGS)).eval()
    tap = FeatureTap.from_probe(model, X64)
    assert tap.layers == [1, 2, 3, 4]
    assert shapes(tap) == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    assert [s.reduction for s in tap.stages] == [4, 8, 16, 32]
    out = tap(model, X64)
    torch.testing.assert_close(out.logits, model(pixel_values=X64).logits)
    # The hook that asks the encoder for these states is gone after the tap.
    plain = model(pixel_values=X64, output_hidden_states=True).reshaped_hidden_states
    assert plain[1].shape[-1] == 8
    if model_class is SwinForImageClassification:
        # Swin alone passes the option down from its classifier: the same maps as asking it directly.
        before = model(pixel_values=X64, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        torch.testing.assert_close(out.stages[0], before.reshaped_hidden_states[1])


def test_focalnet_keeps_the_states_after_downsampling():
    model = FocalNetForImageClassification(FocalNetConfig(**{k: v for k, v in SWIN_KWARGS.items()
                                                             if k not in ("num_heads", "window_size")})).eval()
    tap = FeatureTap.from_probe(model, X64)
    assert [s.reduction for s in tap.stages] == [8, 16, 32]
    torch.testing.assert_close(tap(model, X64).logits, model(pixel_values=X64).logits)


def levit_config() -> LevitConfig:
    return LevitConfig(image_size=64, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                       key_dim=[8, 8, 8], **labels_kwargs())


@pytest.mark.parametrize("model_class", [LevitForImageClassification, LevitForImageClassificationWithTeacher])
def test_levit_token_grid_shrinks_per_stage(model_class):
    torch.manual_seed(0)
    model = model_class(levit_config()).eval()
    hidden = model(pixel_values=X64, output_hidden_states=True).hidden_states
    # Tokens without a CLS prefix, 4x4 after the stem, then 2x2 and 1x1.
    assert [h.shape[1] for h in hidden] == [16, 4, 1, 1]
    tap = FeatureTap.from_probe(model, X64)
    assert tap.layers == [1, 3]
    assert shapes(tap) == [(24, 2, 2), (32, 1, 1)]
    out = tap(model, X64)
    # The "with teacher" head's logits are the mean of its two heads, what its own output calls logits.
    torch.testing.assert_close(out.logits, model(pixel_values=X64).logits)
    assert torch.equal(out.stages[0][:, :, 1, 0], hidden[1][:, 2])


def test_pp_lcnet_logits_come_from_last_hidden_state():
    torch.manual_seed(0)
    model = PPLCNetForImageClassification(PPLCNetConfig(**labels_kwargs())).eval()
    tap = FeatureTap.from_probe(model, X64)
    assert [s.reduction for s in tap.stages] == [4, 8, 16, 32]
    out = tap(model, X64)
    assert out.logits.shape == (2, 10)
    torch.testing.assert_close(out.logits, model(pixel_values=X64).last_hidden_state)


@pytest.mark.parametrize("architecture", ["resnet18", "convnext_atto"])
def test_timm_wrapper_and_raw_timm_agree(tmp_path, architecture):
    wrapper = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, **labels_kwargs()))
    wrapper.save_pretrained(tmp_path)
    wrapper = TimmWrapperForImageClassification.from_pretrained(tmp_path).eval()
    raw = timm.create_model(architecture, pretrained=False, num_classes=10).eval()
    raw.load_state_dict(wrapper.timm_model.state_dict())
    wrapped_tap, raw_tap = FeatureTap.from_probe(wrapper, X), FeatureTap.from_probe(raw, X)
    assert shapes(wrapped_tap) == shapes(raw_tap)
    assert len(raw_tap.stages) == 4 and raw_tap.stages[-1].reduction == 32
    torch.testing.assert_close(wrapped_tap(wrapper, X).logits, wrapper(pixel_values=X).logits)
    torch.testing.assert_close(raw_tap(raw, X).logits, raw(X))


def test_timm_vit_is_isotropic():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=IMAGE_SIZE,
                              patch_size=8, depth=4)
    tap = FeatureTap.from_probe(model, X)
    assert tap.layers == [0, 1, 2, 3]
    assert shapes(tap) == [(192, 4, 4)] * 4


def test_user_named_layers_on_an_unknown_module():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.block2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.block2(self.block1(x)).mean((-2, -1)))

    model = Plain()
    with pytest.raises(ValueError, match="do not know Plain.*student_layers"):
        FeatureTap.from_probe(model, X)
    tap = FeatureTap.from_probe(model, X, ["block1", "block2"])
    assert shapes(tap) == [(8, 16, 16), (16, 8, 8)]
    with pytest.raises(ValueError, match="no submodule named \\['block9'\\]"):
        FeatureTap.from_probe(model, X, ["block9"])


def test_explicit_indices_from_the_command_line(tmp_path):
    model = build(resnet_config([8, 16, 32, 64]), tmp_path)
    tap = FeatureTap.from_probe(model, X, ["2", "-1"])
    assert tap.layers == [2, -1] and shapes(tap) == [(16, 4, 4), (64, 1, 1)]


def test_model_without_hidden_states_gets_a_clear_error(tmp_path):
    class NoHidden(type(build(resnet_config([8, 16]), tmp_path / "a"))):
        def forward(self, pixel_values=None, output_hidden_states=None, **kwargs):
            return super().forward(pixel_values=pixel_values, output_hidden_states=False)

    model = NoHidden(resnet_config([8, 16]))
    with pytest.raises(ValueError, match="returned no hidden_states.*by hand"):
        FeatureTap.from_probe(model, X)


def test_input_smaller_than_total_stride(tmp_path):
    model = build(resnet_config([8, 16, 32, 64]), tmp_path)
    with pytest.raises(ValueError, match="smaller than .* total stride"):
        FeatureTap.from_probe(model, torch.randn(2, 3, 8, 8))


def test_vit_with_wrong_image_size(tmp_path):
    model = build(vit_config(), tmp_path)
    with pytest.raises(ValueError, match="probing ViTForImageClassification \\(the student\\) on a 16x16 input failed"):
        FeatureTap.from_probe(model, torch.randn(2, 3, 16, 16))


def test_default_layers_rule_on_shapes():
    maps = [torch.zeros(1, 4, s, s) for s in (16, 16, 8, 8, 4, 2, 1)]
    # timm-style list (no embedding entry): last map at each of the deepest 4 resolutions.
    model = timm.create_model("resnet10t", pretrained=False)
    assert default_layers(model, maps) == [3, 4, 5, 6]


def test_run_model_rejects_mixed_layer_kinds(tmp_path):
    model = build(resnet_config([8, 16]), tmp_path)
    with pytest.raises(ValueError, match="mix indices and module names"):
        run_model(model, X, [1, "resnet.encoder"])


def test_probe_follows_the_model_dtype(tmp_path):
    # A teacher loaded in half precision must not be probed with the dataset's float32 batch.
    model = build(resnet_config([8, 16, 32, 64]), tmp_path).to(torch.bfloat16)
    tap = FeatureTap.from_probe(model, X)
    assert shapes(tap) == [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)]


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_out_of_range_indices_name_the_role_and_the_valid_range(tmp_path, role):
    model = build(resnet_config([8, 16, 32, 64]), tmp_path)
    # hidden_states: the stem output and 4 stages.
    with pytest.raises(ValueError, match=rf"{role}_layers=\[2, 9\]: \[9\] out of range.*valid indices are 0..4 "
                                         r"\(or -5..-1"):
        if role == "teacher":
            Teacher.from_probe(model, X, ["2", "9"], -1)
        else:
            FeatureTap.from_probe(model, X, ["2", "9"])


def test_teacher_without_hidden_states_names_teacher_layers(tmp_path):
    class NoHidden(type(build(resnet_config([8, 16]), tmp_path / "a"))):
        def forward(self, pixel_values=None, output_hidden_states=None, **kwargs):
            return super().forward(pixel_values=pixel_values, output_hidden_states=False)

    with pytest.raises(ValueError, match="the teacher NoHidden returned no hidden_states") as raised:
        Teacher.from_probe(NoHidden(resnet_config([8, 16])), X, None, -1)
    assert "teacher_layers" in str(raised.value) and "student_layers" not in str(raised.value)


class CountingBackend:
    """A torch.compile backend that runs the captured graphs as they are and counts their calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, graph_module, example_inputs):
        def run(*args):
            self.calls += 1
            return graph_module.forward(*args)

        return run


def test_compiled_transformers_model_runs_compiled(tmp_path):
    # At 64x64 the deepest map is 2x2, so the probe needs no second input size (no recompilation).
    model = build(resnet_config([8, 16, 32, 64]), tmp_path).eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    tap = FeatureTap.from_probe(compiled, X64)
    assert tap.layers == [1, 2, 3, 4] and shapes(tap) == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    before = backend.calls
    out = tap(compiled, X64)
    assert backend.calls > before, "the tap must run the compiled module"
    eager = FeatureTap.from_probe(model, X64)(model, X64)
    torch.testing.assert_close(out.logits, eager.logits)
    for compiled_map, eager_map in zip(out.stages, eager.stages, strict=True):
        torch.testing.assert_close(compiled_map, eager_map)


def test_compiled_timm_and_hooked_models_are_tapped_like_their_originals():
    timm_model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    compiled = torch.compile(timm_model, backend="eager")
    tap = FeatureTap.from_probe(compiled, X)
    assert shapes(tap) == shapes(FeatureTap.from_probe(timm_model, X))
    torch.testing.assert_close(tap(compiled, X).logits, timm_model(X))

    named = FeatureTap.from_probe(compiled, X, ["layer1", "layer4"])
    assert [s.channels for s in named.stages] == [64, 512]
    torch.testing.assert_close(named(compiled, X).stages[1], timm_model.forward_features(X))


def test_compiled_swin_keeps_the_stages_before_downsampling():
    model = SwinForImageClassification(SwinConfig(**SWIN_KWARGS)).eval()
    tap = FeatureTap.from_probe(torch.compile(model, backend="eager"), X64)
    assert [s.reduction for s in tap.stages] == [4, 8, 16, 32]
