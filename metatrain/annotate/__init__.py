"""Thinking annotation: LLM-written thinking for any corpus (`metatrain annotate`).

    inputs.py       raw corpora in: JSON Lines {id, text}, .txt files, metatrain documents
    placement.py    where thoughts go (passage, document, chunk), never changing the text
    prompts.py      prompt templates (files; defaults in templates/)
    generators.py   the generator interface and registry
    openai_chat.py  any OpenAI-compatible chat-completions endpoint
    local_model.py  a metatrain checkpoint (the generational loop)
    checks.py       every block checked before it is kept
    runner.py       the resumable run: in order, nothing lost, nothing requested twice
    pipeline.py     `annotate_corpus`: the command's options -> the parts -> the run
    output.py       the run's files (OUT, its failures, its settings) and resuming into them
"""
