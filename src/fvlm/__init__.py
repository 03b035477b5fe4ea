"""fvlm: fine-grained (anatomy-level) vision-language pre-training for 3D CT."""

__version__ = "0.1.0"
