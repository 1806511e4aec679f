"""Glue between kvarn and Hugging Face transformers (model loading, attention registration)."""
