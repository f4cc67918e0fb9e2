"""The thinking lock: a trained model writes one thinking block after a prompt, with the
mantra forced as in training, and stops at `</thinking>` (what `annotate` relies on)."""

import numpy as np
import pytest

from metatrain.documents import Document, Segment
from metatrain.engine.constraints import THINKING_LOCK, TagConstraints
from metatrain.engine.sampling import SamplingConfig
from metatrain.errors import UserError
from metatrain.generate.generator import Generator
from metatrain.generate.prompts import encode_prompt
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.tokenizer import Encoder


@pytest.fixture(scope="module")
def generator(workdir) -> Generator:
    return Generator.load(workdir)


def test_the_block_opens_with_the_mantra_and_ends_at_its_closing_tag(generator):
    enc = generator.encoder
    opening, closing = (enc.tag_ids[t] for t in (enc.grammar.registry.thinking_open, enc.grammar.registry.thinking_close))
    prompt = Document("d", (Segment("text", "The capital is on the coast.\n"),))
    samples = generator.generate([prompt, "Exports grew."], lock_mode=THINKING_LOCK, max_new_tokens=60,
                                 sampling=SamplingConfig(temperature=0.8), seed=3)
    mantra = enc.mantra_ids.tolist()
    for s in samples:
        assert s.ids[0] == opening and list(s.ids[1:1 + len(mantra)]) == mantra
        assert opening not in s.ids[1:]  # one block, never a second
        if s.finish_reason == "end_of_mode":
            assert s.ids[-1] == closing
        assert s.segments[0].kind == "thinking"


def test_the_lock_ends_rows_outside_thinking(encoder):
    ends = np.asarray(TagConstraints.from_encoder(encoder, lock_mode=THINKING_LOCK).ends)
    assert ends.tolist() == [not s.thinking for s in encoder.grammar.states]


@pytest.mark.parametrize("policy, mantra_after_an_earlier_block", [("every", True), ("first", False), ("none", False)])
def test_the_mantra_follows_the_policy_as_in_training(policy, mantra_after_an_earlier_block):
    enc = Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS, mantra_policy=policy)
    opening = enc.tag_ids[enc.grammar.registry.thinking_open]
    fresh = encode_prompt(enc, Document("d", (Segment("text", "A."),)), THINKING_LOCK)
    assert fresh.prefix == (opening, *([] if policy == "none" else enc.mantra_ids.tolist()))
    later = Document("d", (Segment("text", "A."), Segment("thinking", "Why?"), Segment("text", "B.")))
    assert encode_prompt(enc, later, THINKING_LOCK).prefix == (
        opening, *(enc.mantra_ids.tolist() if mantra_after_an_earlier_block else []))


def test_other_locks_are_still_checked(encoder):
    with pytest.raises(UserError, match="cannot lock generation into mode 'nope'"):
        encode_prompt(encoder, "x", "nope")
