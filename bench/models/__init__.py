"""Encoders, named BatchNorm branches, in-model normalization and heads."""

from bench.models.norm import BranchedBatchNorm2d, Normalize, bn_state, NORMALIZATIONS
from bench.models.resnet import (ResNet18, build_encoder, export_encoder, Classifier, save_encoder, load_encoder,
                                 encoder_spec, encoder_from_spec, encoder_from_config, encoder_options)

__all__ = ["BranchedBatchNorm2d", "Normalize", "bn_state", "NORMALIZATIONS", "ResNet18",
           "build_encoder", "export_encoder", "Classifier", "save_encoder", "load_encoder",
           "encoder_spec", "encoder_from_spec", "encoder_from_config", "encoder_options"]
