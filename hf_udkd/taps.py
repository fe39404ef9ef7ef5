"""Feature taps: turn any supported image classifier into logits plus a list of stage maps.

Every model, whatever its family, is reduced to ``(logits (B, K), [stage maps (B, C, H, W), ...])``,
shallow to deep. The families and where their maps come from:

- transformers CNNs (ResNet, ConvNeXt, RegNet, ...): ``hidden_states`` (4-D), the first entry being the
  stem/embedding output, which is never a stage;
- transformers ViT / DeiT / BEiT-like: ``hidden_states`` are token sequences (B, P + N, D); the P prefix
  tokens are dropped and the N patch tokens reshaped to (B, D, h, w);
- transformers LeViT: ``hidden_states`` are token sequences whose grid shrinks stage by stage;
- transformers Swin, Swinv2, DonutSwin: ``reshaped_hidden_states`` taken before each stage's downsampling
  (as transformers' ``SwinBackbone`` does), so the stride-4 stage is one of them; FocalNet: the states after
  downsampling (its encoder fails on the other option);
- transformers PP-LCNet, whose classifier returns its logits as ``last_hidden_state``;
- timm models, raw or inside transformers' ``TimmWrapperForImageClassification``: ``forward_intermediates``;
- anything else: the outputs of submodules named by the user, captured with forward hooks.

A ``torch.compile``d model (``OptimizedModule``) is tapped as the model it wraps; the compiled module runs
wherever the tap only needs its forward (transformers models without hooks).

The default choice of stages is one rule for all families: for a hierarchical model the last map at each
of the deepest ``num_stages`` resolutions, for an isotropic one (ViT) ``num_stages`` evenly spaced
layers, the last one included.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import is_compiled_module
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

try:
    from transformers import TimmWrapperForImageClassification
except ImportError:  # older transformers without the timm wrapper
    TimmWrapperForImageClassification = None

logger = logging.get_logger(__name__)

KNOWN_FAMILIES = (
    "transformers models that return hidden_states (ResNet, ConvNeXt, RegNet, ViT, DeiT, BEiT, LeViT, Swin, "
    "Swinv2, FocalNet, PP-LCNet, ...)",
    "timm models with forward_intermediates, raw or through TimmWrapperForImageClassification",
)


class TapSetupError(ValueError):
    """The model cannot be tapped as asked (unknown family, no hidden states, bad layer names), whatever the
    input: raised as is, not as a failed probe."""


@dataclass(frozen=True)
class StageInfo:
    """What one tapped stage looks like, for an input of the probed size.

    Attributes:
        layer: where the map comes from: an index into the model's own feature list (``hidden_states`` for
            transformers models, ``forward_intermediates`` indices for timm) or a submodule name.
        channels: C of the (B, C, H, W) map.
        height: H of the map.
        width: W of the map.
        reduction: input height divided by H (the stage's stride).
    """

    layer: int | str
    channels: int
    height: int
    width: int
    reduction: int


@dataclass
class TapOutput:
    """Logits (B, K) and the tapped stage maps, each (B, C, H, W), shallow to deep."""

    logits: torch.Tensor
    stages: list[torch.Tensor]


def _parse_layers(layers: Sequence[int | str] | None) -> list[int | str] | None:
    """Layer names from the command line arrive as strings: digits mean an index, anything else a module."""
    if layers is None:
        return None
    parsed: list[int | str] = []
    for layer in layers:
        if isinstance(layer, str) and layer.lstrip("-").isdigit():
            parsed.append(int(layer))
        else:
            parsed.append(layer)
    return parsed


def _tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, P + N, D) tokens -> (B, D, h, w) patch map, dropping the P prefix tokens (CLS, distillation)."""
    batch, length, dim = tokens.shape
    if grid is None:
        # No patch size known: the patch grid is the largest square that leaves at most 2 prefix tokens.
        for prefix in range(0, 3):
            side = math.isqrt(length - prefix)
            if side * side == length - prefix:
                grid = (side, side)
                break
        else:
            raise ValueError(
                f"cannot reshape {length} tokens into a square patch grid; name 4-D layers by hand instead"
            )
    h, w = grid
    while h * w > length and (h, w) != (1, 1):
        # A hierarchical token model (LeViT) halves its grid per stage, rounding up like its strided attention.
        h, w = (h + 1) // 2, (w + 1) // 2
    prefix = length - h * w
    if prefix < 0:
        raise ValueError(f"{length} tokens are fewer than the {h}x{w} patch grid of the input")
    return tokens[:, prefix:].transpose(1, 2).reshape(batch, dim, h, w)


def _as_map(feature: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    if feature.dim() == 4:
        return feature
    if feature.dim() == 3:
        return _tokens_to_map(feature, grid)
    raise ValueError(f"a tapped feature has shape {tuple(feature.shape)}; expected (B, C, H, W) or (B, N, D)")


def _patch_grid(model: nn.Module, pixel_values: torch.Tensor) -> tuple[int, int] | None:
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if patch is None:
        return None
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``model`` itself."""
    return model._orig_mod if is_compiled_module(model) else model


def _timm_module(model: nn.Module) -> nn.Module | None:
    """The timm model inside ``model``, or None if ``model`` is not a timm model."""
    model = uncompiled(model)
    if TimmWrapperForImageClassification is not None and isinstance(model, TimmWrapperForImageClassification):
        return model.timm_model
    if not isinstance(model, PreTrainedModel) and hasattr(model, "forward_intermediates"):
        return model
    return None


def model_family(model: nn.Module) -> str:
    """'timm', 'transformers' or 'hooks' (a module whose layers must be named by hand)."""
    if _timm_module(model) is not None:
        return "timm"
    if isinstance(uncompiled(model), PreTrainedModel):
        return "transformers"
    return "hooks"


@contextmanager
def _capture(model: nn.Module, names: Sequence[str]):
    """Collect the outputs of the named submodules during one forward."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise TapSetupError(
            f"{type(model).__name__} has no submodule named {missing}; names look like "
            f"{[n for n, _ in model.named_children()][:8]}"
        )
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def store(_module, _inputs, output):
            captured[name] = output[0] if isinstance(output, (tuple, list)) else output

        return store

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def logits_of(output) -> torch.Tensor:
    """The (B, K) logits of an image classifier's output: a tensor (timm), ``logits``, or PP-LCNet's
    ``last_hidden_state``, which is where that classifier puts them."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        last = getattr(output, "last_hidden_state", None)
        if last is not None and last.dim() == 2:
            return last
        raise ValueError(
            f"the model's output ({type(output).__name__}) has no logits; the model must be an image classifier"
        )
    return logits


# Model class -> name of its Swin-like encoder ("" for none). Filled eagerly (the probe runs before any
# compilation), so that a compiled training step only looks a name up.
_ENCODERS_BEFORE_DOWNSAMPLING: dict[type[nn.Module], str] = {}
# FocalNet's encoder takes the option but reshapes the states with the downsampled grid and fails
# (transformers 5.24); its taps keep the states after downsampling.
_BROKEN_BEFORE_DOWNSAMPLING = ("FocalNetEncoder",)


def _encoder_before_downsampling(model: nn.Module) -> nn.Module | None:
    """The encoder of a Swin-like model (Swin, Swinv2, DonutSwin), the outermost submodule whose forward takes
    ``output_hidden_states_before_downsampling``; None for any other model."""
    name = _ENCODERS_BEFORE_DOWNSAMPLING.get(type(model))
    if name is None:
        name = next(
            (
                module_name
                for module_name, module in model.named_modules()
                if module is not model
                and type(module).__name__ not in _BROKEN_BEFORE_DOWNSAMPLING
                and "output_hidden_states_before_downsampling" in inspect.signature(module.forward).parameters
            ),
            "",
        )
        _ENCODERS_BEFORE_DOWNSAMPLING[type(model)] = name
    return model.get_submodule(name) if name else None


def _set_before_downsampling(_module, args, kwargs):
    return args, {**kwargs, "output_hidden_states_before_downsampling": True}


@contextmanager
def _states_before_downsampling(model: nn.Module) -> Iterator[None]:
    """Swin-like classifiers do not pass ``output_hidden_states_before_downsampling`` down to their encoder
    (all but Swin ignore it); set it on the encoder itself, only for this forward."""
    encoder = _encoder_before_downsampling(model)
    if encoder is None:
        yield
        return
    handle = encoder.register_forward_pre_hook(_set_before_downsampling, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _warn_eager(model: nn.Module, why: str) -> None:
    logger.warning_once(
        f"{type(uncompiled(model)).__name__} is compiled (torch.compile), but its feature tap runs the uncompiled "
        f"module: {why}. For a student, torch_compile=True in UDKDTrainingArguments compiles the whole training "
        "step, taps included."
    )


def run_model(
    model: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int | str] | None, role: str = "student"
) -> TapOutput:
    """Run ``model`` once and return its logits and the maps of ``layers`` (all candidates when None).

    ``layers`` are indices into the model's feature list (``hidden_states`` for transformers models,
    ``forward_intermediates`` indices for timm) or submodule names (any model, through forward hooks).
    ``role`` ("student" or "teacher") names the model in errors.
    """
    base = uncompiled(model)
    name = type(base).__name__
    if layers is not None and any(isinstance(layer, str) for layer in layers):
        if not all(isinstance(layer, str) for layer in layers):
            raise TapSetupError(f"{role}_layers {list(layers)} mix indices and module names; use one kind")
        if base is not model:
            # Hooks added to a compiled module after its first compilation are not seen by its graph.
            _warn_eager(model, "hooks on named submodules")
        with _capture(base, layers) as captured:
            logits = logits_of(base(pixel_values))
        grid = _patch_grid(base, pixel_values)
        return TapOutput(logits, [_as_map(captured[layer], grid) for layer in layers])

    timm_model = _timm_module(base)
    if timm_model is not None:
        if base is not model:
            _warn_eager(model, "timm's forward_intermediates is not the compiled forward")
        final, intermediates = timm_model.forward_intermediates(pixel_values, indices=layers)
        return TapOutput(timm_model.forward_head(final), list(intermediates))

    if not isinstance(base, PreTrainedModel):
        raise TapSetupError(
            f"the feature taps do not know {name} (the {role}). Known: {'; '.join(KNOWN_FAMILIES)}. For any other "
            f"module, name the layers to tap by hand ({role}_layers=['layer1', 'layer2', ...], submodule "
            "names from model.named_modules()); they are captured with forward hooks."
        )
    if base is not model and _encoder_before_downsampling(base) is not None:
        _warn_eager(model, "Swin-like encoders give their stages before downsampling through a hook")
        model = base
    with _states_before_downsampling(base):
        output = model(pixel_values=pixel_values, output_hidden_states=True)
    hidden = getattr(output, "reshaped_hidden_states", None) or getattr(output, "hidden_states", None)
    if not hidden:
        raise TapSetupError(
            f"the {role} {name} returned no hidden_states with output_hidden_states=True, so its stages cannot "
            f"be tapped. Name the layers to tap by hand ({role}_layers = submodule names from "
            "model.named_modules())."
        )
    grid = _patch_grid(base, pixel_values)
    picked = hidden if layers is None else [hidden[i] for i in layers]
    return TapOutput(logits_of(output), [_as_map(h, grid) for h in picked])


def default_layers(model: nn.Module, candidates: list[torch.Tensor], num_stages: int = 4) -> list[int]:
    """Indices of the default stages among all candidate maps of ``model`` (METHOD.md §1).

    Hierarchical models: the last map at each of the deepest ``num_stages`` resolutions. Isotropic models
    (every map at one resolution, e.g. ViT): ``num_stages`` evenly spaced maps, the last one included.
    transformers' first hidden state is the embedding/stem output and never a stage.
    """
    first = 1 if model_family(model) == "transformers" else 0
    indices = list(range(first, len(candidates)))
    if not indices:
        raise ValueError(f"{type(model).__name__} exposes no stage after its embedding output")
    sizes = [tuple(candidates[i].shape[-2:]) for i in indices]
    if len(set(sizes)) > 1:
        last_at_size: dict[tuple[int, int], int] = {}
        for index, size in zip(indices, sizes, strict=True):
            last_at_size[size] = index
        return sorted(last_at_size.values())[-num_stages:]
    count = min(num_stages, len(indices))
    return [indices[(k + 1) * len(indices) // count - 1] for k in range(count)]


def _nominal_reductions(
    model: nn.Module, pixel_values: torch.Tensor, layers: list[int | str], size: int = 256
) -> list[int] | None:
    """Each layer's stride, read on a large input; None for models that take one input size only (ViT)."""
    large = torch.zeros(1, pixel_values.shape[1], size, size, dtype=pixel_values.dtype, device=pixel_values.device)
    try:
        maps = run_model(model, large, layers).stages
    except (RuntimeError, ValueError, AssertionError):
        return None
    return [max(1, round(size / m.shape[-2])) for m in maps]


def _check_indices(layers: list[int], count: int, name: str, role: str) -> None:
    """Refuse indices outside the model's ``count`` candidate maps before any training starts."""
    outside = [layer for layer in layers if not -count <= layer < count]
    if outside:
        raise ValueError(
            f"{role}_layers={layers}: {outside} out of range; the {role} {name} has {count} maps to tap, valid "
            f"indices are 0..{count - 1} (or -{count}..-1 from the deepest). Leave {role}_layers unset for the "
            "default stages, or name submodules instead."
        )


class FeatureTap:
    """Knows which stages of one model to tap, and their shapes.

    Build it with :meth:`from_probe`, which runs the model once on a real batch to learn the shapes (and
    picks the default stages when ``layers`` is None); then ``tap(model, pixel_values)`` returns a
    :class:`TapOutput` with exactly those stages.
    """

    def __init__(self, layers: list[int | str], stages: list[StageInfo], num_labels: int):
        self.layers = layers
        self.stages = stages
        self.num_labels = num_labels

    @classmethod
    @torch.no_grad()
    def from_probe(
        cls,
        model: nn.Module,
        pixel_values: torch.Tensor,
        layers: Sequence[int | str] | None = None,
        role: str = "student",
    ) -> FeatureTap:
        """Run ``model`` (in eval mode, so no BatchNorm statistics move) on ``pixel_values`` (B, 3, H, W).

        ``role`` ("student" or "teacher") names the model, and its ``<role>_layers`` option, in errors.
        """
        # The probe batch comes from the dataset on the CPU in float32; the model may already sit on a GPU or
        # be loaded in half precision.
        weight = next(model.parameters(), None)
        if weight is not None:
            pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        was_training = model.training
        model.eval()
        try:
            return cls._probe(model, pixel_values, _parse_layers(layers), role)
        finally:
            model.train(was_training)

    @classmethod
    def _probe(
        cls, model: nn.Module, pixel_values: torch.Tensor, layers: list[int | str] | None, role: str
    ) -> FeatureTap:
        name = type(uncompiled(model)).__name__
        height, width = pixel_values.shape[-2:]
        by_index = layers is None or not any(isinstance(layer, str) for layer in layers)
        try:
            # Indices are checked against every candidate, so the probe asks for all of them.
            probe = run_model(model, pixel_values, None if by_index else layers, role)
        except TapSetupError:
            raise
        except (RuntimeError, ValueError, AssertionError) as error:
            raise ValueError(
                f"probing {name} (the {role}) on a {height}x{width} input failed: {error}. Check that the image size "
                "matches the model (its image processor's size, or its config.image_size for ViT-like models) and "
                "is at least the model's total stride."
            ) from error
        if layers is None:
            layers = default_layers(model, probe.stages)
        if by_index:
            _check_indices(layers, len(probe.stages), name, role)
            stages = [probe.stages[i] for i in layers]
        else:
            stages = probe.stages
        reductions = [max(1, round(height / s.shape[2])) for s in stages]
        if stages[-1].shape[-2:] == (1, 1):
            # A 1x1 deepest map may hide stages that had nothing left to reduce: measure the real strides.
            reductions = _nominal_reductions(model, pixel_values, layers) or reductions
            if min(height, width) < reductions[-1]:
                raise ValueError(
                    f"the {height}x{width} input is smaller than {name}'s (the {role}'s) total stride "
                    f"({reductions[-1]}): its deepest stages collapse to 1x1. Use larger images (resize in the "
                    "transform) or tap shallower layers."
                )
        infos = [
            StageInfo(layer, s.shape[1], s.shape[2], s.shape[3], reduction)
            for layer, s, reduction in zip(layers, stages, reductions, strict=True)
        ]
        return cls(list(layers), infos, probe.logits.shape[-1])

    def __call__(self, model: nn.Module, pixel_values: torch.Tensor) -> TapOutput:
        return run_model(model, pixel_values, self.layers)

    def describe(self) -> str:
        """One line per stage, for the log at start."""
        return ", ".join(f"{s.layer}: {s.channels}x{s.height}x{s.width} (/{s.reduction})" for s in self.stages)
