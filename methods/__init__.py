"""Built-in pretraining methods: one module per method, each registering itself."""
