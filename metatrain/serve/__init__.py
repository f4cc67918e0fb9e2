"""Serving a trained model over the OpenAI API (`metatrain serve`): the batching engine
and the HTTP app."""
