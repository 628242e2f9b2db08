r"""Conditional 3D volume GAN on ct_phantom chest volumes.

  python -m experiments.train --config configs/phantom_3d.py --workdir runs/phantom3d

The default is sized for a 2-core CPU (under 30 minutes): 16x32x32 volumes
(10 mm voxels over the 160 mm chest), the `Ti` transformer, a width-16
discriminator, batch 8, 600 steps. 3D convolutions run at ~4-8 GFLOP/s on
XLA:CPU, so the 32x64x64 `S` model took ~43 s per step there (12 h for 1,000
steps); that size is the `full` variant, for accelerators:

  python -m experiments.train --config configs/phantom_3d.py:full --workdir runs/phantom3d_full

Tokens are 3D patches; attention defaults to axial (depth, height and width
lines: O(N * (D + H + W)) instead of full attention's O(N^2), which is where
memory breaks at volume token counts; see medgen_jax/bench/step_memory.py).
Variants (comma-separated): `quick` (8x16x16, CPU seconds; used by the
tests), `full` (32x64x64, transformer `S`, width-32 D, 1,000 steps), `attention=NAME` (full | axial | window | window_shifted), `cnn`,
`seq=N` (sequence parallel: shard the token grids' depth over N devices of
the 'seq' mesh axis, the rest over 'data'; axial or full attention, jit mode;
see docs/scaling.md).
"""
import ml_collections

from configs import common, phantom_gan


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, values = common.parse_variants(
      arg, config="phantom_3d", flags=("quick", "full", "cnn"), values=("attention", "seq"))
  if "quick" in variants and "full" in variants:
    raise ValueError("phantom_3d: 'quick' and 'full' are two sizes; pick one")
  config = phantom_gan.get_config(",".join(["3d"] + [v for v in variants if v != "full"]))
  config.model.token_grid = 4
  config.model.window_size = 4
  config.model.attention_stages = 2
  if "quick" not in variants:       # (quick keeps phantom_gan's tiny settings)
    # CPU size: 4x8x8 tokens, 8x16x16 at stage 1 (attention), conv to 16x32x32.
    config.data.image_size = 32
    config.data.depth = 16
    # One volume per subject: more subjects than the 2D default's 200 / 20 / 20
    # so the test split gives 64 volumes to evaluate on.
    config.data.num_subjects.update(train=400, validation=32, test=64)
    config.model.variant = "Ti"
    config.model.d_width = 16
    config.train.num_steps = 600
    config.train.update(sample_every=200, checkpoint_every=200)
    # Lazy R1: the cheaper step pays for the second compiled step.
    config.loss.r1_every = 4
    # The judge reads volumes through a 4x4x4 space-to-depth stem, with fewer
    # steps and subjects than the 2D recipe, whose 2x2 stem and 6,000 steps
    # do not fit a CPU budget in 3D.
    config.judge.update(steps=1500, subjects=1000, stem_patch=4, widths=(32, 64, 128))
    # The FD / PRDC features: the judge's network shape (its own seed, trained
    # on the real train split), which trains in minutes on a CPU core where the
    # 2x2x2 stem of the 2D extractor takes hours. Conditions are read by the
    # judge: these features read them at chance in 3D (docs/results.md).
    config.eval.update(extractor_stem_patch=4, extractor_widths=(32, 64, 128),
                       extractor_feature_dim=128, extractor_batch_size=32)
    if "full" in variants:
      config.data.image_size = 64
      config.data.depth = 32
      config.model.variant = "S"
      config.model.d_width = 32
      config.train.num_steps = 1000
      # An 8x8x8 stem gives the judge the default size's token grid (8x8x4),
      # so it trains on one CPU core in ~40 minutes (docs/results.md).
      config.judge.stem_patch = 8
  # Off in 3D: the teacher's extra steps of batch-64 volumes would not fit
  # the CPU budget beside the GAN's.
  config.loss.teacher_weight = 0.0
  config.selector.candidates = 1  # plain sampling
  # The non-saturating objective (docs/results.md, "3D generation").
  config.loss.update(gan="nonsaturating", r1_gamma=0.2, r2_gamma=0.0)
  if "quick" in variants:
    config.data.image_size = 16
    config.data.depth = 8          # 8x16x16: 4x8x8 tokens, one attention stage
    config.model.attention_stages = 1
    config.model.window_size = 2
    config.train.batch_size = 2
  if "attention" in values:         # explicit attention= wins over the default
    config.model.attention = values["attention"]
  if "seq" in values:
    config.parallel.mesh = dict(data=-1, seq=int(values["seq"]))
    config.parallel.logical_axis_rules = (("batch", "data"), ("depth", "seq"))
  return config
