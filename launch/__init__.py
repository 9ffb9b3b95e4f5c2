"""ddpm-scale: launch."""
