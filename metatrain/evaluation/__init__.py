"""Evaluation that answers the method's questions (`metatrain eval`, docs/eval.md).

    text_bytes   UTF-8 bytes per token: the denominator of bits per byte
    documents    the run's held-out documents (or a file's), whole and encoded
    layout       documents in rows, every target scored once, with its document
    scoring      per-document, per-role sums of loss through the training forward pass
    ablation     the same text with its thinking kept, removed, shuffled, mantra only
    stats        paired bootstrap intervals over documents
    free_generation  grammar and mantra rates with the mask and forcing off
    probes       linear probes for mode and role on every layer's hidden states
    report       the report `metatrain eval` writes and prints
    evaluate     a run's checkpoint evaluated, report.json and probes.png written
    placement    host values onto the parameters' mesh and back (multi-process: process 0 writes)
    in_loop      the cheap part (bpb/text, removed - kept) at every trainer evaluation
"""
