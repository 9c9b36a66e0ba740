"""Region metrics per image (on the device) and dataset-level statistics."""
