"""glad_core: Generalizable LoRA tuning with RegulArized GraDient (GLAD) for CLIP-style models."""
__version__ = "0.1.0"
