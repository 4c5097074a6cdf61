"""umeml: federated multimodal learning (WSI + genomics) for glioma grading, subtyping and survival."""

__version__ = "0.1.0"
__all__ = ["__version__"]
