"""Replies written by a language model: the job queue, the HTTP client, the prompt, the stage."""
