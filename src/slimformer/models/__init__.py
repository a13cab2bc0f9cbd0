"""Built-in models, model loading and structure discovery."""
