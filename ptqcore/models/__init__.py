"""Architecture adapters and the model registry."""

from .adapters import ADAPTERS, Adapter, LinearGroup, adapter_for
from .zoo import MODELS, LoadedModel, MissingPackage, cache_dir, check_model_name, load_model, package_dir

__all__ = [
    "ADAPTERS", "Adapter", "LinearGroup", "LoadedModel", "MODELS", "MissingPackage", "adapter_for",
    "cache_dir", "check_model_name", "load_model", "package_dir",
]
