"""BlueLM-V on ONNX Runtime: config, tokenizer, tiler, bundle format, decoder, engine."""
