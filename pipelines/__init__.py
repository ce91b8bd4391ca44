"""Beam jobs and the pure transforms they are made of; text and vision tokenizers."""
