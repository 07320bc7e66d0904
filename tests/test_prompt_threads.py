"""One `PromptBuilder` serves concurrent calls: no per-call state lives on the instance.

The server builds prompts on request threads (validation) while its worker builds others. A chat
prompt joins an image and its text with "\\n", a raw prompt with nothing; when that choice was
kept on the builder (`self._join`), a raw call landing inside a chat call changed the chat's text.
"""
import sys
import threading

from PIL import Image

from dreamllm_fast.prompt import PromptBuilder

IMG = Image.new("RGB", (32, 24), (10, 120, 200))
IMG2 = Image.new("RGB", (24, 32), (200, 20, 10))


def _builder(pipe) -> PromptBuilder:
    return PromptBuilder(pipe.tokenizer, pipe.config, pipe.special)


class _Interrupting(str):
    """A text whose special-token check runs another call on the same builder, as a thread
    switch at that moment would (deterministic)."""

    def __new__(cls, text, hook):
        s = super().__new__(cls, text)
        s.hook = hook
        return s

    def __contains__(self, item):
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return super().__contains__(item)


def test_a_call_inside_another_call_leaves_it_unchanged(ref_pipe):
    b = _builder(ref_pipe)
    want_chat = b.chat_text([{"role": "user", "content": [IMG, "What is this?"]}], [])
    want_raw = b.raw_text([IMG2, "A cat."], [])
    assert "\nWhat is this?" in want_chat and "<im_end>A cat." in want_raw
    nested = {}
    text = _Interrupting("What is this?", lambda: nested.setdefault("raw", b.raw_text([IMG2, "A cat."], [])))
    got = b.chat_text([{"role": "user", "content": [IMG, text]}], [])
    assert nested["raw"] == want_raw  # the nested call ran in the middle of the chat call
    assert got == want_chat


def test_threads_sharing_a_builder_get_their_own_prompts(ref_pipe):
    b = _builder(ref_pipe)
    chat_msgs = [{"role": "user", "content": [IMG, "Describe it."]}]
    raw_content = [IMG2, "A dog.", IMG]
    want_chat, want_raw = b.chat(chat_msgs).ids, b.raw(raw_content).ids
    errors = []

    def work(kind):
        for _ in range(40):
            got = b.chat(chat_msgs).ids if kind == "chat" else b.raw(raw_content).ids
            if got != (want_chat if kind == "chat" else want_raw):
                errors.append(kind)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in ("chat", "raw") * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, f"{len(errors)} prompts built wrong under concurrency"
