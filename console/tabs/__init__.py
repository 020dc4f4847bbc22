"""One module per console tab, each with render(api)."""
