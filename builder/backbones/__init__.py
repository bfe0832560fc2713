"""Backbones without MindSpore: a checkpoint found and read (Hugging Face layout, GGUF), its architecture and its
sizes.  The lowest layer above errors: everything else reads what it loads."""
