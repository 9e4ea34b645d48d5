"""affectprep: LLM-assisted preprocessing and training for emotion recognition."""
__version__ = "0.1.0"
