r"""Conditional flow matching on ct_phantom: the GAN's data, backbone and evaluation.

  python -m experiments.train --config configs/phantom_flow.py --workdir runs/flow
  python -m experiments.evaluate --config configs/phantom_flow.py --workdir runs/flow
  python -m experiments.sample --config configs/phantom_flow.py --workdir runs/flow \
      --num_samples 64 --out runs/flow/samples

The data, model and eval sections are `configs/phantom_gan.py`'s (2D) or
`configs/phantom_3d.py`'s (`3d`), so a GAN run and a flow run differ only in
the objective: `model.generator='flow'` is a DiT-style velocity network on the
same TransformerBlocks, attention variants and condition embedding
(`medgen_jax/models/velocity.py`), trained by `medgen_jax/train/flow.py`.
Sampling integrates the ODE from noise (t = 1) to data (t = 0); the sampler
is part of the model section, so evaluation and sampling can change it:

  --config.model.sample_steps=32 --config.model.solver=heun --config.model.guidance_scale=2

Variants (comma-separated): `quick` (tiny, CPU seconds; used by the tests),
`3d` (phantom_3d's 16x32x32 volumes, axial attention), `attention=NAME`
(full | axial | window | window_shifted).
"""
import ml_collections

from configs import common, phantom_3d, phantom_gan


# model.* settings of the discriminator, which a flow run does not have.
GAN_MODEL_KEYS = ("discriminator", "d_width", "spectral_norm", "d_blocks_per_stage",
                  "d_expansion", "d_group_size", "d_minibatch_std", "d_condition_heads")


def image_numel(config: ml_collections.ConfigDict):
  """Voxels x channels of one image, by reference: the flow generator's noise
  is the image at t = 1, so `model.latent_dim` follows `data.image_size`."""
  size = config.data.get_ref("image_size")
  numel = size * size * len(config.data.modalities)
  return numel * config.data.get_ref("depth") if config.data.mode == "3d" else numel


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, values = common.parse_variants(
      arg, config="phantom_flow", flags=("quick", "3d"), values=("attention",))
  base = [v for v in variants if v != "3d"]
  config = (phantom_3d.get_config(",".join(base)) if "3d" in variants
            else phantom_gan.get_config(",".join(base)))
  config.task = "flow"
  m = config.model
  m.generator = "flow"
  m.latent_dim = image_numel(config)
  # Blocks at one token resolution (the variant gives width and heads);
  # token_grid tokens along the smallest axis, so the patch side is
  # image_size / token_grid (4 voxels at 64x64).
  m.backbone = "dit"   # 'dit': blocks at one token grid; 'hourglass': model.hourglass levels
  m.depth = 6
  m.token_grid = 16
  m.window_size = 4
  # Conditions are dropped as a whole by loss.cfg_dropout instead of per field,
  # from the global batch (the parallel modes then agree exactly).
  m.cond_dropout = 0.0
  # Sampler (models/ode.py): uniform steps from t = 1 to 0; guidance_scale 1
  # = the conditional velocity only, > 1 classifier-free guidance against
  # the null condition embeddings.
  m.sample_steps = 32
  m.solver = "euler"
  m.guidance_scale = 1.0
  # The objective has no discriminator and no teacher: only the generator's
  # settings, its optimiser and the flow loss are kept from the GAN config.
  for key in GAN_MODEL_KEYS:
    del m[key]
  del config.teacher
  config.optim = ml_collections.ConfigDict(dict(
      g_lr=3e-4, b1=0.9, b2=0.999, schedule=config.optim.schedule, warmup_steps=100,
      grad_clip=config.optim.grad_clip))
  if not {"quick", "3d"} & set(variants):
    # Sized for the 15-minute CPU budget; each 24-image sample grid runs the
    # 32-step sampler.
    config.train.update(num_steps=1500, sample_every=500, checkpoint_every=500)
  config.loss = common.flow_loss_section()
  if "3d" in variants:
    m.token_grid = 4   # 16x32x32 volumes: 4x8x8 tokens of 4x4x4 voxels
    m.depth = 4
  if "quick" in variants:
    m.depth = 2
    m.token_grid = 4
    m.window_size = 2
    m.sample_steps = 3
    config.optim.warmup_steps = 0
    config.loss.ema_decay = 0.9
  if "attention" in values:
    m.attention = values["attention"]
  return config
