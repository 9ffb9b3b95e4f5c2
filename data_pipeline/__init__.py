"""ddpm-scale: data_pipeline."""
