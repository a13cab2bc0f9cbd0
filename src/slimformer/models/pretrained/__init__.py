"""Real pretrained models that install offline, built into Hugging Face folders."""
