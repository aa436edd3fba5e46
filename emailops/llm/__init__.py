"""Replies written by a language model: the job queue, the HTTP client, the prompt (the stage that
turns answers into replies is ``replies.llm_stage``; ``llm`` never imports ``replies``)."""
