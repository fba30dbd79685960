"""DSNet in PyTorch: model, official-checkpoint loader, ONNX export, training, evaluation."""
