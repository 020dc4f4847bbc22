"""The training service: LoRA training jobs, candidate versions, federation."""
