r"""Flow matching on ct_phantom with the hourglass velocity network (HDiT / U-ViT style).

  python -m experiments.train --config configs/phantom_flow_hdit.py --workdir runs/flow_hdit
  python -m experiments.evaluate --config configs/phantom_flow_hdit.py --workdir runs/flow_hdit

`configs/phantom_flow.py` with `model.backbone='hourglass'`: token levels
joined by pixel-unshuffle / shuffle, `model.attention` (windows) at the fine
levels, full attention at the coarsest, skips between matching levels
(`medgen_jax/models/hourglass.py`). Sizes live in `model.hourglass`:

  --config.model.hourglass.patch=2 --config.model.hourglass.widths='(64, 128, 256)' \
      --config.model.hourglass.depths='(1, 2, 4)'

Variants (comma-separated): `quick` (tiny, CPU seconds; used by the tests),
`3d` (phantom_3d's 16x32x32 volumes), `attention=NAME` (fine levels).
"""
import ml_collections

from configs import common, phantom_flow


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, values = common.parse_variants(
      arg, config="phantom_flow_hdit", flags=("quick", "3d"), values=("attention",))
  config = phantom_flow.get_config(arg)
  m = config.model
  m.backbone = "hourglass"
  m.hourglass = ml_collections.ConfigDict(dict(
      patch=4,            # voxels per finest token along each axis
      widths=(128, 256),  # channels per level, finest first
      depths=(2, 4),      # blocks per fine level on each side; coarsest: in total
      head_dim=32,        # channels per attention head
      skip="linear",      # 'linear' (Dense on concat) | 'lerp' (HDiT)
  ))
  m.window_size = 4       # fine-level windows (tokens per side)
  if "3d" in variants:
    m.hourglass.update(patch=2, widths=(64, 128), depths=(1, 2))
  if "quick" in variants:
    m.hourglass.update(patch=2, widths=(16, 32), depths=(1, 1), head_dim=8)
    m.window_size = 2
  del values
  return config
