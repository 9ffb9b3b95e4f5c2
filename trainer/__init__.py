"""ddpm-scale: trainer."""
