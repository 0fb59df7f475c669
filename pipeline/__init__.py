"""convnext-edge: ConvNeXt from PyTorch to verified, measured TVM artifacts."""
