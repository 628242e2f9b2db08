"""R3GAN's normalisation-free ConvNet discriminator, projection-conditioned.

Huang, Gokaslan, Kuleshov & Tompkin, "The GAN is dead; long live the GAN! A
Modern GAN Baseline" (NeurIPS 2024), adapted to 2D and 3D channels-last
inputs:

  stem        1x1 conv image -> width (after the patchify stem of
              `discriminator.resolution_plan` on large inputs)
  stage i     residual blocks at width_i, then a transition: 2x average
              pooling and a 1x1 conv width_i -> width_{i+1}
  last stage  residual blocks, then a full-extent depthwise ("basis") conv
              collapsing the 4x4 (4x4x4, 4x8x8) grid to one position and a
              linear map to the features phi(x)
  logit       `discriminator.conditional_logits` (projection conditioning,
              optional condition heads), as in the ResNet discriminator

Residual block: 1x1 conv C -> C*expansion, leaky ReLU 0.2, 3x3 grouped conv
(`group_size` channels per group), leaky ReLU 0.2, 1x1 conv back to C, added
to the input. The 1x1 convs are `nn.Dense` on the channel axis, the same
map (XLA:CPU ran the conv form 2.7x slower). There is no normalisation
anywhere (no spectral, batch or group norm), so the module has only
'params': R3GAN trains it stably with the R1 + R2 penalties of the
relativistic loss (`loss.gan='rpgan'`).

Fix-up initialisation instead of normalisation: the last conv of every
residual branch starts at zero, so each block is the identity at init and
the network is a shallow stem + transitions + head; the other two branch
convs use He-style variance scaling (gain of leaky ReLU 0.2) times
L^(-1/(2m-2)), L the number of residual blocks and m = 3 convs per branch,
which bounds the growth of the residual stream's variance with depth once
the last convs move off zero.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from medgen_jax.data.info import ConditionField
from medgen_jax.models.discriminator import (check_inputs, conditional_logits,
                                             resolution_plan)
from medgen_jax.models.variants import parse_dtype

Dtype = Any

_SLOPE = 0.2  # leaky ReLU negative slope
# Gain that keeps the activation variance through a leaky ReLU (He et al.).
_GAIN = math.sqrt(2.0 / (1.0 + _SLOPE ** 2))
_BRANCH_CONVS = 3  # m of the fix-up scale


def msr_init(gain: float) -> nn.initializers.Initializer:
  """Normal init with std gain / sqrt(fan_in) (fan_in per group for grouped convs)."""
  return nn.initializers.variance_scaling(gain ** 2, "fan_in", "normal")


def fixup_gain(num_blocks: int) -> float:
  """Init gain of a residual branch's first two convs: _GAIN * L^(-1/(2m-2))."""
  return _GAIN * num_blocks ** (-1.0 / (2 * _BRANCH_CONVS - 2))


class GroupedConv(nn.Module):
  """A 3x3 'SAME' conv in groups of `group_size` channels, with a bias.

  The kernel is stored as a grouped `nn.Conv` stores it, [3, .., 3,
  group_size, C] (`feature_group_count = C // group_size`). With `dense` it
  is expanded to the block-diagonal [3, .., 3, C, C] kernel of one ordinary
  conv, the same map at C / group_size times the FLOPs: XLA:CPU's grouped
  conv is slower still (forward and backward 578 ms against 39 ms for the
  dense form on [16, 32, 32, 64] in groups of 16, mostly its kernel gradient).

  Attributes:
    group_size: channels per group; must divide C.
    kernel_init: initialiser of the stored kernel (fan-in per group).
    dense: compute through the block-diagonal kernel.
    dtype: compute dtype.
  """
  group_size: int
  kernel_init: nn.initializers.Initializer
  dense: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, *spatial, C] -> [B, *spatial, C]."""
    ndim, channels = x.ndim - 2, x.shape[-1]
    groups = channels // self.group_size
    window = (3,) * ndim
    kernel = self.param("kernel", self.kernel_init,
                        (*window, self.group_size, channels), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    if self.dense:
      # Output channel o belongs to group o // group_size and reads only
      # that group's inputs: [.., i, (g, o)] -> [.., (g, i), (g', o)] * eye.
      grouped = kernel.reshape(*window, self.group_size, groups, self.group_size)
      kernel = jnp.einsum("...igo,gh->...giho", grouped,
                          jnp.eye(groups, dtype=kernel.dtype))
      kernel, groups = kernel.reshape(*window, channels, channels), 1
    spatial = "".join("DHW"[3 - ndim:])
    y = lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (1,) * ndim, "SAME",
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        feature_group_count=groups)
    return y + bias.astype(self.dtype)


class ResidualBlock(nn.Module):
  """x + conv1(act(grouped conv3(act(conv1(x))))), the identity at init.

  The first two convs carry a bias before the activation (R3GAN's biased
  activation); the last has none and starts at zero.

  Attributes:
    expansion: width of the branch's inner layers, as a multiple of C.
    group_size: channels per group of the 3x3 conv.
    num_blocks: L, residual blocks in the whole network (fix-up scale).
    dense_groups: compute the grouped conv densely (`GroupedConv`).
    dtype: compute dtype.
  """
  expansion: int
  group_size: int
  num_blocks: int
  dense_groups: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, *spatial, C] -> [B, *spatial, C]."""
    channels = x.shape[-1]
    wide = channels * self.expansion
    init = msr_init(fixup_gain(self.num_blocks))
    h = nn.Dense(wide, dtype=self.dtype, kernel_init=init, name="expand")(x)
    h = nn.leaky_relu(h, _SLOPE)
    h = GroupedConv(self.group_size, kernel_init=init, dense=self.dense_groups,
                    dtype=self.dtype, name="grouped")(h)
    h = nn.leaky_relu(h, _SLOPE)
    h = nn.Dense(channels, dtype=self.dtype, use_bias=False,
                 kernel_init=nn.initializers.zeros, name="contract")(h)
    return x + h


class R3GANDiscriminator(nn.Module):
  """Normalisation-free residual ConvNet -> one logit per image (module docstring).

  Attributes:
    conditions: condition fields (from `DatasetInfo.conditions`).
    width: channels of the first stage; doubles per downsampling up to the
      ResNet discriminator's cap (`discriminator.resolution_plan`).
    blocks_per_stage: residual blocks at every resolution.
    expansion: inner width of a residual branch, as a multiple of its input.
    group_size: channels per group of the branch's 3x3 conv; must divide
      width * expansion (then it divides every stage's inner width).
    condition_heads: add the condition-prediction heads.
    dense_groups: compute the grouped convs densely (`GroupedConv`); the
      parameters and the function are the same either way.
    dtype: compute dtype (params stay float32; the logit is float32).
  """
  conditions: tuple[ConditionField, ...] = ()
  width: int = 32
  blocks_per_stage: int = 1
  expansion: int = 1
  group_size: int = 16
  condition_heads: bool = False
  dense_groups: bool = False
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    super().__post_init__()
    if self.blocks_per_stage < 1 or self.expansion < 1:
      raise ValueError(f"r3gan discriminator: model.d_blocks_per_stage "
                       f"{self.blocks_per_stage} and model.d_expansion "
                       f"{self.expansion} must be >= 1")
    wide = self.width * self.expansion
    if self.group_size < 1 or wide % self.group_size:
      raise ValueError(f"model.d_group_size {self.group_size} must divide the "
                       f"residual branches' width model.d_width * "
                       f"model.d_expansion = {wide}")

  @nn.compact
  def __call__(self, images: jnp.ndarray, conditions: Mapping[str, jnp.ndarray],
               *, train: bool, with_predictions: bool = False):
    """Scores images.

    Args:
      images: [B, *spatial, C] in [-1, 1], 2 or 3 spatial dims.
      conditions: name -> [B]; int32 class (-1 unknown) or float32 value
        (NaN unknown), one entry per field in `self.conditions`.
      train: unused (nothing here differs between training and scoring);
        kept for the discriminators' common signature.
      with_predictions: also return the condition predictions (needs
        `condition_heads`).

    Returns:
      logits [B] float32; with `with_predictions`, (logits, predictions) as
      in `ResNetDiscriminator`.
    """
    check_inputs(images, conditions, self.conditions,
                 with_predictions=with_predictions,
                 condition_heads=self.condition_heads)
    x, widths = resolution_plan(images.astype(self.dtype), self.width)
    ndim = x.ndim - 2
    num_blocks = self.blocks_per_stage * len(widths)
    block = lambda: ResidualBlock(self.expansion, self.group_size, num_blocks,
                                  dense_groups=self.dense_groups, dtype=self.dtype)
    x = nn.Dense(widths[0], dtype=self.dtype, use_bias=False,
                 kernel_init=msr_init(1.0), name="stem")(x)
    for i, width in enumerate(widths):
      for _ in range(self.blocks_per_stage):
        x = block()(x)
      if i + 1 < len(widths):
        # Pool before the 1x1 conv: the same linear map at 1/2**ndim the cost.
        x = nn.avg_pool(x, (2,) * ndim, (2,) * ndim)
        if widths[i + 1] != width:
          x = nn.Dense(widths[i + 1], dtype=self.dtype, use_bias=False,
                       kernel_init=msr_init(1.0), name=f"transition_{i}")(x)
    # Basis: a full-extent depthwise conv, i.e. one learned weight per
    # position and channel of the last grid, a position-aware pooling (a sum
    # would discard where features lie). As an einsum: XLA:CPU's depthwise
    # conv took ~30x longer forward and backward.
    basis = self.param("basis", msr_init(1.0), x.shape[1:], jnp.float32)
    channels = x.shape[-1]
    x = jnp.einsum("bpc,pc->bc", x.reshape(x.shape[0], -1, channels),
                   basis.reshape(-1, channels).astype(self.dtype))  # [B, C]
    features = nn.Dense(channels, use_bias=False, dtype=self.dtype,
                        kernel_init=msr_init(1.0), name="feature_map")(x)
    features = features.astype(jnp.float32)
    self.sow("intermediates", "features", features)
    # Nothing here is normalised, the projection and linear head included.
    logits, predictions = conditional_logits(
        features, conditions, self.conditions, spectral_norm=False,
        condition_heads=self.condition_heads, train=train)
    return (logits, predictions) if with_predictions else logits


def build_r3gan_discriminator(model_config, info) -> R3GANDiscriminator:
  """R3GANDiscriminator from `config.model` and a `DatasetInfo`.

  `model.spectral_norm` is ignored (this discriminator has no normalisation).

  Raises:
    ValueError: a group size that does not divide the branch width, a
      minibatch-std channel (not supported here), or an unknown dtype.
  """
  if int(model_config.d_minibatch_std):
    raise ValueError("model.d_minibatch_std must be 0 with "
                     "model.discriminator='r3gan' (no minibatch-std channel)")
  return R3GANDiscriminator(
      conditions=tuple(info.conditions), width=int(model_config.d_width),
      blocks_per_stage=int(model_config.d_blocks_per_stage),
      expansion=int(model_config.d_expansion),
      group_size=int(model_config.d_group_size),
      condition_heads=bool(model_config.d_condition_heads),
      # XLA:CPU's grouped convs are the slow path (GroupedConv); GPUs and
      # TPUs run them natively at 1 / groups of the dense FLOPs.
      dense_groups=jax.default_backend() == "cpu",
      dtype=parse_dtype(model_config.dtype))
