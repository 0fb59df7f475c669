"""Training a ConvNeXt on the CPU: `recipe.py` (the settings, schedule, optimizer groups and
augmentations), `loop.py` (a run: data, epochs, evaluation, resume state, checkpoint and record)."""
