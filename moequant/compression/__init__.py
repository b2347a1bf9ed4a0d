"""Compression: a 16-bit MoE checkpoint in, a GPTQ-layout checkpoint out (see :func:`compress`).

``run`` holds the layer loop; ``calibration`` the calibration windows; ``plan`` the spec of
every module from the recipe; ``layer`` one layer, calibrated or rounded; ``experts`` how each
expert is calibrated; ``solve`` quantising and packing a stack of modules; ``record`` what the
checkpoint says about itself; ``resume`` the state an interrupted run continues from.
"""

from moequant.compression.calibration import RANDOM_CALIB, CalibSettings
from moequant.compression.plan import plan
from moequant.compression.record import RECIPE_FILE, RECORD_FILE
from moequant.compression.run import CompressResult, compress

__all__ = ["RANDOM_CALIB", "RECIPE_FILE", "RECORD_FILE", "CalibSettings", "CompressResult", "compress", "plan"]
