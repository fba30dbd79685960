"""BlueLM-V model side: configs, dynamic resolution, PyTorch model, converters, tokenizer."""
