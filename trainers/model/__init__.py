"""The model a node holds (FT_MODEL): its parts, loading from local files, full-model files and shared weights."""
