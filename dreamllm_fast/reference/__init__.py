"""The oracle: DreamLLM composed from transformers and diffusers exactly as the original."""
from .model import ReferenceModel, ReferenceSession

__all__ = ["ReferenceModel", "ReferenceSession"]
