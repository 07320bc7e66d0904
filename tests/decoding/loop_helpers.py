"""The stub backend's scripted walk for the decode-loop tests (test_loop.py, test_stop_strings.py):
every sequence draws the ordinary pieces WORDS[0], WORDS[1], ... (cycling), and with `dream_every`
a `<dream_start>` after every that many text tokens (dreamllm_fast/devtools/stub.py)."""
import torch

from dreamllm_fast.config import DreamLLMConfig, SpecialTokens
from dreamllm_fast.devtools.stub import StubModel

WORDS = list(range(259, 384))  # the tiny tokenizer's merged pieces
PROMPT = 10


def stub(tok, **kw):
    return StubModel(DreamLLMConfig.from_name("tiny"), SpecialTokens.from_tokenizer(tok), WORDS, **kw)


def prefilled(model, n=PROMPT):
    """A new session with an n-position prompt: (session, its last logits)."""
    s = model.new_session()
    return s, s.extend(torch.zeros(n, model.config.llm.hidden_size))
