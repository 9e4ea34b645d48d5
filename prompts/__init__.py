"""Prompt templates and FACS tables: plain text files, hashed into the cache keys of the stages that use them."""
