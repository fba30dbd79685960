"""BlueLM-V in PyTorch: modeling, bundle export, scene-QA training, checkpoint converters."""
