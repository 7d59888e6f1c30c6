"""The policy document model and the image reference grammar it is written in."""
