"""The chat and completion request models share one base, `GenerationFields`
(serving/request_models.py), and still rank their faults in the order the wire format always had:
a request with several faults is refused for the same one as before (`parse_body` reports the
first). No server: the models and `parse_body` only."""
import json

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")

from pydantic import Field  # noqa: E402

from dreamllm_fast.serving.completions import UNSUPPORTED_COMPLETION, CompletionRequest  # noqa: E402
from dreamllm_fast.serving.protocol import ApiError, parse_body  # noqa: E402
from dreamllm_fast.serving.request_models import (UNSUPPORTED_CHAT, ChatCompletionRequest,  # noqa: E402
                                                  GenerationFields)

# the orders of the models before they shared a base (commit 80fbae0), spelled out here so that
# a change of the models' own FIELD_ORDER or of how it is applied shows up
CHAT_ORDER = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
              "top_k", "seed", "stop", "n", "stream", "stream_options", "modalities", "user",
              "metadata", "num_inference_steps", "guidance_scale", "negative_prompt", "max_images",
              "sampler"]
COMPLETION_ORDER = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                    "n", "stream", "stream_options", "user", "images"]
SHARED = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
          "stream_options", "user"]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}

# (route, body with two or more faults, the param the client is told about): in each case a
# field the subclass declares sits before a shared one on the wire, or the other way round
FAULTS = [
    ("chat", {"messages": [], "temperature": -1}, "messages"),
    ("chat", {"messages": None, "n": 0, "user": 3}, "messages"),
    ("chat", {"max_completion_tokens": 0, "temperature": "hot"}, "max_completion_tokens"),
    ("chat", {"max_tokens": 0, "max_completion_tokens": 0}, "max_tokens"),
    ("chat", {"modalities": ["audio"], "user": 3}, "modalities.0"),
    ("chat", {"stream_options": {"include_usage": "yes"}, "modalities": ["audio"]},
     "stream_options.include_usage"),
    ("chat", {"user": 3, "metadata": {"a": 1}, "sampler": "euler"}, "user"),
    ("completion", {"prompt": True, "max_tokens": "many"}, "prompt.str"),
    ("completion", {"prompt": None, "stop": 4, "images": "x"}, "prompt.str"),
    ("completion", {"images": 1, "user": 3}, "user"),
]


def test_models_keep_their_wire_order():
    assert list(ChatCompletionRequest.FIELD_ORDER) == CHAT_ORDER
    assert list(CompletionRequest.FIELD_ORDER) == COMPLETION_ORDER
    for model, order in ((ChatCompletionRequest, CHAT_ORDER), (CompletionRequest, COMPLETION_ORDER)):
        schema = model.model_json_schema()
        assert set(schema["properties"]) == set(order)
        assert schema["additionalProperties"] is False  # extra="forbid", as before


def test_shared_fields_are_declared_once_in_the_base():
    assert list(GenerationFields.model_fields) == SHARED
    for model in (ChatCompletionRequest, CompletionRequest):
        assert not set(model.__annotations__) & set(SHARED), model  # none redeclared
        for name in SHARED:  # the same bounds and defaults as the base's
            assert repr(model.model_fields[name]) == repr(GenerationFields.model_fields[name])


@pytest.mark.parametrize("route,faults,param", FAULTS)
def test_the_first_fault_on_the_wire_is_reported(route, faults, param):
    model, unsupported, body = (ChatCompletionRequest, UNSUPPORTED_CHAT, CHAT) if route == "chat" \
        else (CompletionRequest, UNSUPPORTED_COMPLETION, COMPLETION)
    with pytest.raises(ApiError) as e:
        parse_body(json.loads(json.dumps({**body, **faults})), model, unsupported)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    assert e.value.message.startswith(f"{param}: ")


def test_unknown_fields_are_still_refused_after_the_known_ones():
    with pytest.raises(ApiError) as e:
        parse_body({**COMPLETION, "suffixx": 1, "temperature": -1}, CompletionRequest, UNSUPPORTED_COMPLETION)
    assert e.value.param == "temperature"
    with pytest.raises(ApiError) as e:
        parse_body({**CHAT, "tools_": []}, ChatCompletionRequest, UNSUPPORTED_CHAT)
    assert (e.value.param, e.value.code) == ("tools_", "unknown_parameter")
    assert e.value.message == "Unrecognized request argument supplied: tools_"


def test_a_field_order_that_misses_a_field_is_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match=r"Bad\.FIELD_ORDER must name each of its fields once.*'extra'"):
        class Bad(GenerationFields):
            FIELD_ORDER = tuple(SHARED)
            extra: int = Field(0)
    with pytest.raises(TypeError, match="FIELD_ORDER must name each of its fields once"):
        class Twice(GenerationFields):
            FIELD_ORDER = (*SHARED, "model")
