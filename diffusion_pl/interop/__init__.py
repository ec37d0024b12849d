"""Weight converters from other libraries' networks to diffusion_pl's (diffusers), and exported models."""

from diffusion_pl.interop.export import Exported, export_checkpoint, load_exported, read_export_config

__all__ = ["Exported", "export_checkpoint", "load_exported", "read_export_config"]
