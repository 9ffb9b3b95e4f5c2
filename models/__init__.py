"""ddpm-scale: models."""
