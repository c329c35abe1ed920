"""The files a build copies into each model repository (importable here for their tables)."""
