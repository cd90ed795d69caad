"""Analyses of trained models behind the paper's qualitative figures.

- `inversion`: feature inversion maps of one representation coordinate (paper Figure 5).
- `landscape`: the adversarial loss along filter-normalised random weight directions (paper Figure 6).

Both work on eval-mode models, are seeded, leave weights and BatchNorm statistics as they found
them, and return small results with a `to_record()` (plain JSON data) that the figure functions
in `bench.report.analysis_figures` take as they are.
"""

from bench.analysis.inversion import Inversion, InversionConfig, choose_seed_images, invert_feature
from bench.analysis.landscape import (Landscape, LandscapeConfig, adversarial_loss, filter_normalized_direction,
                                      loss_landscape, perturbed_weights)

__all__ = ["Inversion", "InversionConfig", "choose_seed_images", "invert_feature", "Landscape", "LandscapeConfig",
           "adversarial_loss", "filter_normalized_direction", "loss_landscape", "perturbed_weights"]
