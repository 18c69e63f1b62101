"""cnx: train ControlNeXt on Stable Video Diffusion, from a laptop CPU to many GPUs."""

__version__ = "0.1.0"
