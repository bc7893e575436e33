"""Paper-scale planning (config merging, memory and time per step) and the `speechllm models` commands."""
