"""Encoders, named BatchNorm branches, in-model normalization, heads, and their files."""

from bench.models.norm import BranchedBatchNorm2d, Normalize, bn_state, NORMALIZATIONS
from bench.models.resnet import (ResNet18, build_encoder, export_encoder, Classifier, encoder_from_config,
                                 encoder_options)
from bench.models.files import (encoder_from_spec, encoder_spec, load_classifier, load_encoder, save_classifier,
                                save_encoder)

__all__ = ["BranchedBatchNorm2d", "Normalize", "bn_state", "NORMALIZATIONS", "ResNet18", "build_encoder",
           "export_encoder", "Classifier", "encoder_from_config", "encoder_options", "encoder_from_spec",
           "encoder_spec", "load_classifier", "load_encoder", "save_classifier", "save_encoder"]
